import subprocess
import sys

from tests.support import ROOT


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(m for m in ('torch', 'transformers', 'flask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {m for m in out.strip().split(",") if m}


def test_import_web_loads_neither_torch_nor_transformers():
    assert _loaded_after("import web; web.create_app") - {"flask"} == set()


def test_shared_contract_is_light():
    assert _loaded_after("import jobs.schema, jobs.store, jobs.celery_app, jobs.workers, config") == set()


def test_worker_launcher_does_not_import_torch_before_setting_devices():
    assert _loaded_after("import worker.launcher") - {"flask"} == set()
