import pytest

torch = pytest.importorskip("torch", reason="make crosscheck installs torch (CPU) and transformers")
pytest.importorskip("transformers", reason="make crosscheck installs torch (CPU) and transformers")
