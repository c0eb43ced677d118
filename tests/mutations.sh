#!/usr/bin/env bash
# Usage: bash tests/mutations.sh   (a few minutes; prints one line per mutation: each must fail)
# Each mutation applied alone to a fresh copy of the working tree; the named tests must fail.
set -u
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$SRC/.venv/bin/python}
run() {  # name, file, python-replace-old, new, tests...
  name=$1 file=$2 old=$3 new=$4; shift 4
  d=$(mktemp -d)
  (cd $SRC && git ls-files -co --exclude-standard | grep -v '^\.venv' | tar -cf - -T -) | (cd $d && tar -xf -)
  $PY - "$d/$file" "$old" "$new" <<'PYEOF'
import sys, pathlib
p, old, new = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s = p.read_text(); assert s.count(old) >= 1, (p, old); p.write_text(s.replace(old, new))
PYEOF
  [ $? -eq 0 ] || { echo "$name: NOT APPLIED (the code changed: update this mutation)"; rm -rf $d; return; }
  out=$(cd $d && TRITON_INTERPRET=1 PYTHONPATH=$d $PY -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tail -1)
  echo "$name: $out"
  rm -rf $d
}
run "saliency w2/d" sparse_expansion/kernels/obs.py "** 2 / d[:, None, :] ** 2" "** 2 / d[:, None, :]" tests/test_maths.py
run "shrink weights swapped" sparse_expansion/methods/expansion/stages.py 'mul_(n / (n + tau)).add_(H_full[0] if rule == "shrink" else within, alpha=tau / (n + tau))' 'mul_(tau / (n + tau)).add_(H_full[0] if rule == "shrink" else within, alpha=n / (n + tau))' tests/test_maths.py
run "2:4 check off by one" sparse_expansion/kernels/routed_matmul.py "nz.sum(-1) > 2" "nz.sum(-1) > 3" tests/test_maths.py
run "wanda norm squared" sparse_expansion/solvers.py "clamp(min=0).sqrt()" "clamp(min=0)" tests/test_maths.py
run "calibration left out of the identity" sparse_expansion/storage/checkpoint.py '"calibration_sha256": hashlib' '"calibration_sha256": "" or hashlib.sha256(b"").hexdigest() or hashlib' tests/test_identity.py
run "overwrite deletes the new" sparse_expansion/storage/outputs.py "            final.rename(old)
            self.folder.rename(final)
            shutil.rmtree(old)" "            final.rename(old)
            self.folder.rename(final)
            shutil.rmtree(final)
            old.rename(final)" tests/test_flags.py
run "re-solve on the raw cluster Hessian" sparse_expansion/methods/expansion/method.py "W_hat[e:e + 1], solve_hessians(slice(e, e + 1))," "W_hat[e:e + 1], stats.H[e:e + 1]," tests/test_expansion.py -k re_solve
run "OWL norms without the square root" sparse_expansion/allocation.py "return self.sq[0, 0].sqrt()" "return self.sq[0, 0]" tests/test_allocation.py
run "rank means not weighted by rows" sparse_expansion/distributed.py "    H.mul_(count.to(H.dtype)[:, None, None])
    dist.all_reduce(H)
    dist.all_reduce(count)
    H.div_(count.clamp(min=1).to(H.dtype)[:, None, None])" "    dist.all_reduce(H)
    dist.all_reduce(count)
    H.div_(world_size())" tests/test_distributed.py -k weigh
run "planner's cluster share rounded down" sparse_expansion/plan.py "share = math.ceil(clusters / ranks)" "share = max(1, clusters // ranks)" tests/test_plan.py
run "Triton quantizer rounds half up" sparse_expansion/kernels/obs.py "v = tl.where(tl.abs(v) < 4194304.0, (v + 12582912.0) - 12582912.0, v)" "v = tl.floor(v + 0.5)" tests/test_kernels.py -k half_steps
run "control (no change)" sparse_expansion/version.py "__version__" "__version__" tests/test_maths.py
