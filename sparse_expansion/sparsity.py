"""Sparsity targets: an unstructured rate in [0, 1) or an N:M pattern (N pruned of every M)."""
from dataclasses import dataclass

from .errors import UsageError, option, setting


@dataclass(frozen=True)
class Sparsity:
    rate: float   # fraction of weights pruned (N/M for N:M)
    n: int = 0    # N:M pattern: n pruned of every m consecutive input columns; 0 = unstructured
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.rate:g}"

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        text = str(text).strip()
        if ":" in text:
            try:
                n, m = (int(p) for p in text.split(":"))
            except ValueError:
                raise UsageError(f"{setting('sparsity', text)}: write N:M with integers, e.g. 2:4") from None
            if not 1 <= n < m:
                raise UsageError(f"{setting('sparsity', text)}: N:M needs 1 <= N < M (N pruned of every M), "
                                 f"e.g. 2:4")
            return cls(n / m, n, m)
        try:
            rate = float(text)
        except ValueError:
            raise UsageError(f"{setting('sparsity', text)}: give a rate in [0, 1) such as 0.5, or N:M such "
                             f"as 2:4") from None
        if not 0.0 <= rate < 1.0:
            raise UsageError(f"{setting('sparsity', text)}: the rate must lie in [0, 1), e.g. 0.5")
        return cls(rate)

    def check_columns(self, columns: int, layer: str = "layer") -> None:
        if self.structured and columns % self.m:
            raise UsageError(f"{layer} has {columns} input columns, not divisible by M={self.m}; "
                             f"choose an M that divides it or an unstructured rate")


def check_bits(bits: int | None) -> None:
    if bits is not None and not 2 <= bits <= 8:
        raise UsageError(f"{setting('bits', bits)}: joint quantization supports 2 to 8 bits; omit {option('bits')} "
                         f"for none")
