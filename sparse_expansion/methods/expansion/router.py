"""Routers: PCA projection + nearest k-means centroid, fit on a layer's calibration inputs.

k-means backends behind one function: cuML on CUDA when it is installed, and a torch Lloyd with
k-means++ initialisation on any device. `choose_backend` picks one and says which.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UsageError, setting
from ...kernels.hessian import add_gram, complete_hessian

KMEANS_BACKENDS = ("auto", "torch", "cuml")
ROWS_PER_CHUNK = 16384  # rows of x turned into fp32 at a time by the PCA and the projection
_TO_FP32_BY_PROMOTION = (torch.float16, torch.bfloat16, torch.float32)  # x - fp32 mean is fp32


class Router(nn.Module):
    """Routes each token to the nearest centroid of its PCA projection.

    mean: [d] and basis: [d, k] (both None without PCA); centroids: [K, k]. Everything in fp32.
    """

    def __init__(self, centroids: torch.Tensor, mean: torch.Tensor | None = None, basis: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("centroids", centroids.float().contiguous())
        self.register_buffer("mean", None if mean is None else mean.float().contiguous())
        self.register_buffer("basis", None if basis is None else basis.float().contiguous())

    @property
    def clusters(self) -> int:
        return self.centroids.shape[0]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The PCA coordinates [T, k] (fp32) of x [..., d], computed over chunks of rows, so that
        no fp32 copy of a large x exists."""
        x = x.reshape(-1, x.shape[-1])
        if self.basis is None:
            return x.float()
        if x.dtype not in _TO_FP32_BY_PROMOTION:
            x = x.float()
        # rows - mean promotes 16-bit rows to fp32 exactly as rows.float() - mean, in one op
        parts = [(rows - self.mean) @ self.basis for rows in x.split(ROWS_PER_CHUNK)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Expert index [T] (int64) of every token of x [..., d]. Five tensor ops for a few tokens
        (a decoding step): the subtraction of the mean, two products, the distances and argmin."""
        return nearest_centroid(self.project(x), self.centroids, self._centroid_norms())

    def _centroid_norms(self) -> torch.Tensor:
        """‖c‖² of every centroid, kept until the centroids change (a move or an in-place write)."""
        key = (self.centroids.data_ptr(), self.centroids._version)
        if getattr(self, "_norms_key", None) != key:
            self._norms, self._norms_key = self.centroids.square().sum(1), key
        return self._norms

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """centroids, and mean/basis when there is a PCA, on the CPU (for safetensors)."""
        return {key: buf.detach().cpu().contiguous() for key, buf in self.named_buffers()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "Router":
        return cls(tensors["centroids"], tensors.get("mean"), tensors.get("basis"))

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, pca={'none' if self.basis is None else tuple(self.basis.shape)}"


def nearest_centroid(z: torch.Tensor, centroids: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_c ‖z − c‖² for every row of z [N, k] (the ‖z‖² term does not change the argmin);
    norms: ‖c‖² of the centroids, when the caller keeps them."""
    if norms is None:
        norms = centroids.square().sum(1)
    return torch.sub(norms, z @ centroids.t(), alpha=2.0).argmin(1)  # ‖c‖² − 2·z·c


def fit_pca(x: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], basis [d, components]): top principal directions of x [N, d]; mean and
    covariance in fp32, accumulated over chunks of rows (no fp32 copy of x)."""
    x = x.reshape(-1, x.shape[-1])
    n, d = max(x.shape[0], 1), x.shape[1]
    mean = torch.zeros(d, dtype=torch.float32, device=x.device)
    for rows in x.split(ROWS_PER_CHUNK):
        mean += rows.float().sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    for rows in x.split(ROWS_PER_CHUNK):
        centered = rows.float() - mean
        add_gram(cov, centered, 1.0, 1.0)
    return mean, leading_directions(complete_hessian(cov) / n, components)


def pca_from_hessian(H: torch.Tensor, mean: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_pca's (mean, basis) from the moments a pass over the rows already gives: their Hessian
    H = 2/N·XᵀX [d, d] (complete) and mean [d]; the covariance is H/2 − μμᵀ (no pass over x)."""
    mean = mean.to(H.device, torch.float32)
    return mean, leading_directions(torch.addr(H, mean, mean, beta=0.5, alpha=-1.0), components)


def leading_directions(cov: torch.Tensor, components: int) -> torch.Tensor:
    """The top `components` eigenvectors [d, components] of a covariance [d, d], in fp32 (they
    agree with an fp64 decomposition to |cos| > 0.999999 on a SmolLM2 down_proj input, at a third
    of its time), each signed so that its largest |entry| is positive (reproducible fits)."""
    _, vecs = torch.linalg.eigh(cov.float())  # ascending eigenvalues
    basis = vecs[:, -components:].flip(1)
    return basis * torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))


def _kmeans_pp(z: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii), with 2 + log k candidates per step."""
    n = z.shape[0]
    trials = 2 + int(math.log(k))
    centers = [z[torch.randint(n, (1,), generator=gen, device=z.device)]]
    closest = (z - centers[0]).square().sum(1)
    for _ in range(1, k):
        probs = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1.0 / n)
        cand = torch.multinomial(probs, trials, replacement=True, generator=gen)
        d = torch.cdist(z, z[cand]).square()  # [n, trials]
        pot = torch.minimum(closest[:, None], d).sum(0)
        best = int(pot.argmin())
        centers.append(z[cand[best]][None])
        closest = torch.minimum(closest, d[:, best])
    return torch.cat(centers)


def kmeans_torch(z: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 300,
                 tol: float = 1e-4) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ init; best of `restarts` runs by inertia.

    The restarts run side by side as one batch. Returns (centroids [k, dim], inertia). A run
    stops when its centroid shift falls below tol × the mean per-feature variance (scikit-learn's
    rule); an emptied cluster takes the point farthest from its centroid.
    """
    z = z.float()
    gen = torch.Generator(device=z.device).manual_seed(seed)
    threshold = tol * z.var(0, unbiased=False).mean()
    c = torch.stack([_kmeans_pp(z, k, gen) for _ in range(restarts)])  # [R, k, dim]
    active = torch.arange(restarts, device=z.device)  # the runs still moving
    for _ in range(max_iter):
        labels = _nearest_batched(z, c[active])  # [A, N]
        new, counts = _cluster_sums(z, labels, k)
        new /= counts.clamp(min=1)[..., None]
        for r, e in torch.nonzero(counts == 0).tolist():
            far = (z - new[r][labels[r]]).square().sum(1).argmax()
            new[r, e] = z[far]
        moving = (new - c[active]).square().sum((1, 2)) > threshold
        c[active] = new
        active = active[moving]
        if not len(active):
            break
    inertia = torch.stack([(z - cr[nearest_centroid(z, cr)]).square().sum() for cr in c])
    best = int(inertia.argmin())
    return c[best], float(inertia[best])


def sums_by_label(z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sums [..., k, dim] of the rows of z [N, dim] by label, for labels [N] or [A, N]. On a CPU by
    index_add (N·dim work, in row order); elsewhere by a one-hot product: a GPU's index_add adds
    atomically, in an order that varies from run to run (and rank to rank)."""
    if z.device.type != "cpu":
        return torch.nn.functional.one_hot(labels, k).to(z.dtype).transpose(-1, -2) @ z
    if labels.dim() == 2:
        return torch.stack([sums_by_label(z, lab, k) for lab in labels])
    return torch.zeros(k, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)


def _cluster_sums(z: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [A, k, dim] of the rows of z [N, dim] per cluster, counts [A, k]) for A labelings [A, N]."""
    return sums_by_label(z, labels, k), torch.stack([torch.bincount(lab, minlength=k) for lab in labels])


def _nearest_batched(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """nearest_centroid for R sets of centroids c [R, k, dim] at once: labels [R, N]."""
    return (c.square().sum(2)[:, None, :] - 2.0 * torch.matmul(z, c.transpose(1, 2))).argmin(2)


def kmeans_cuml(z: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 300,
                tol: float = 1e-4) -> tuple[torch.Tensor, float]:
    """cuML's KMeans on a CUDA tensor (k-means++ init); same return as kmeans_torch."""
    import cupy
    from cuml.cluster import KMeans
    km = KMeans(n_clusters=k, n_init=restarts, random_state=seed, max_iter=max_iter, tol=tol, init="k-means++")
    km.fit(cupy.from_dlpack(z.float().contiguous()))
    centroids = torch.from_dlpack(cupy.asarray(km.cluster_centers_)).to(z.device).float()
    return centroids, float(km.inertia_)


def choose_backend(requested: str, device: torch.device | str) -> str:
    """'cuml' on CUDA when installed (auto), else 'torch'; an impossible request is an error."""
    if requested not in KMEANS_BACKENDS:
        raise UsageError(f"{setting('kmeans_backend', requested)}: use one of {', '.join(KMEANS_BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    has_cuml = importlib.util.find_spec("cuml") is not None
    if requested == "cuml" and not (on_cuda and has_cuml):
        raise UsageError(f"{setting('kmeans_backend', 'cuml')} needs a CUDA device and cuML (pip install "
                         f"'.[gpu]'); use {setting('kmeans_backend', 'torch')}")
    if requested == "auto":
        return "cuml" if on_cuda and has_cuml else "torch"
    return requested


@dataclass
class RouterFit:
    router: Router
    labels: torch.Tensor   # [N] cluster of every calibration token (= router.assign(x))
    inertia: float
    backend: str


def pca_components(columns: int, pca_factor: int) -> int:
    """PCA components of a router on `columns` inputs (0: no PCA)."""
    return max(1, columns // pca_factor) if pca_factor else 0


def fit_router(x: torch.Tensor, clusters: int, pca_factor: int = 32, seed: int = 0, restarts: int = 10,
               backend: str = "auto", pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> RouterFit:
    """PCA to d // pca_factor components (no PCA when pca_factor == 0), then k-means. `pca`: the
    (mean, basis) to use instead of fitting them on x (e.g. `pca_from_hessian` on every row
    where x is a sample)."""
    x = x.reshape(-1, x.shape[-1])
    mean = basis = None
    if pca_factor:
        mean, basis = pca if pca is not None else fit_pca(x, pca_components(x.shape[1], pca_factor))
    router = Router(torch.zeros(clusters, basis.shape[1] if basis is not None else x.shape[1]),
                    mean, basis).to(x.device)
    z = router.project(x)
    backend = choose_backend(backend, x.device)
    if clusters == 1:
        centroids, inertia = z.mean(0, keepdim=True), float((z - z.mean(0)).square().sum())
    else:
        centroids, inertia = (kmeans_cuml if backend == "cuml" else kmeans_torch)(z, clusters, seed, restarts)
    router.centroids.copy_(centroids)
    return RouterFit(router, nearest_centroid(z, router.centroids), inertia, backend)
