import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CLIPSEARCH_HOME and XDG dirs: nothing is written outside tmp."""
    root = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CLIPSEARCH_HOME", str(root / "clipsearch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "data"))
    monkeypatch.setenv("NO_COLOR", "1")
    return root
