"""Byzantine attacks: pure functions of what a Byzantine node holds → the vector it sends.

An attack is what a Byzantine node does to what it sends (or to its own data). It runs as
a real peer and sees only what it legitimately receives, so every attack has the signature

    attack(own, honest, rng, n, f, **keys) -> Tensor[d]

* ``own`` (Tensor[d]): the Byzantine node's own, honestly trained, flattened model.
* ``honest`` (Tensor[k, d]): the honest vectors it legitimately holds this round (its
  honest neighbours' models; an omniscient attacker may be handed all honest models).
  k may be 0 (no honest neighbour heard from yet): then ``own`` is the only honest
  estimate, i.e. the attack computes its statistics over ``own[None]`` instead.
* ``rng`` (torch.Generator or None): seeded by the caller; the only source of randomness
  (None: torch's global generator, not reproducible).
* ``n``, ``f``: nodes taking part in the aggregation the vector is meant for and how many
  of them are Byzantine; only attacks that need them (``alie``'s default z) use them.
* ``keys``: the attack's own config keys, declared by its keys dataclass
  (`ATTACKS.keys_of`); `craft` passes only those, so a config section may hold keys of
  other layers too. The function defaults equal the dataclass defaults.

The result has ``own``'s shape, dtype and device; inputs are never modified. Attacks:

==============  ==========================================================================
``none``        ``own`` unchanged (honest behaviour, a baseline)
``sign_flip``   −scale · mean(honest)
``ipm``         −epsilon · mean(honest) (inner product manipulation, Xie et al. 2020)
``alie``        mean − z · std per coordinate (A Little Is Enough, Baruch et al. 2019)
``gaussian``    mean(honest) + N(0, sigma²) per coordinate, or N(0, sigma²) alone
``inf``         +inf in every coordinate
``nan``         NaN in every coordinate
``mimic``       a copy of honest row ``target``
``label_flip``  a data attack: ``own`` unchanged, the node trains on `flip_labels` labels
==============  ==========================================================================

Data attacks (`DATA_ATTACKS`) poison the node's training data rather than the vector; the
node applies them when it trains, and sends its honestly computed result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Mapping, Optional

import torch

from ..registry import Registry, key

Attack = Callable[..., torch.Tensor]
ATTACKS: Registry[Attack] = Registry("attack")

#: Attacks that poison the node's own training data; their vector is ``own`` unchanged.
DATA_ATTACKS: frozenset[str] = frozenset({"label_flip"})

#: Argument names every attack takes positionally; no keys dataclass may declare them.
ARGUMENTS = ("own", "honest", "rng", "n", "f")


# helpers ----------------------------------------------------------------------------
def attack_keys(name: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `keys` that attack `name` declares (unknown name: KeyError)."""
    cls = ATTACKS.keys_of(name)
    if cls is None:
        return {}
    return {fl.name: keys[fl.name] for fl in dataclasses.fields(cls) if fl.name in keys}


def craft(name: str, own: torch.Tensor, honest: torch.Tensor, rng: Optional[torch.Generator], n: int, f: int,
          keys: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The vector Byzantine attack `name` sends, called with only the keys it declares."""
    return ATTACKS.get(name)(own, honest, rng, n, f, **attack_keys(name, keys or {}))


def _rows(own: torch.Tensor, honest: torch.Tensor) -> torch.Tensor:
    """The honest estimate as rows (Tensor[k, d], own's dtype and device): `honest`, or
    ``own[None]`` when k = 0."""
    if not isinstance(own, torch.Tensor) or own.dim() != 1 or not own.is_floating_point():
        raise ValueError(f"own must be a 1-D floating-point tensor, got "
                         f"{tuple(own.shape) if isinstance(own, torch.Tensor) else type(own).__name__}")
    honest = torch.as_tensor(honest)
    if honest.numel() == 0 and (honest.dim() == 1 or (honest.dim() == 2 and honest.shape[1] in (0, own.numel()))):
        return own[None].clone()
    if honest.dim() != 2 or honest.shape[1] != own.numel():
        raise ValueError(f"honest must be Tensor[k, {own.numel()}] (rows like own), got {tuple(honest.shape)}")
    return honest.to(dtype=own.dtype, device=own.device)


def _mean(own: torch.Tensor, honest: torch.Tensor) -> torch.Tensor:
    return _rows(own, honest).mean(0)


def alie_z(n: int, f: int) -> float:
    """The z_max of Baruch et al. (2019): with s = ⌊n/2 + 1⌋ − f honest "supporters"
    needed, z = Φ⁻¹((n − s)/n). E.g. n = 10, f = 2: s = 4, z = Φ⁻¹(0.6) ≈ 0.2533."""
    if n < 1 or not 0 <= f <= n:
        raise ValueError(f"alie needs n >= 1 nodes and 0 <= f <= n Byzantine ones, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"alie's z_max = Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − f is undefined for n={n}, f={f} "
                         f"((n − s)/n = {p:g}); set the key z explicitly")
    return NormalDist().inv_cdf(p)


# attacks ----------------------------------------------------------------------------
@ATTACKS.register("none")
def no_attack(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int) -> torch.Tensor:
    """``own`` unchanged (honest behaviour)."""
    _rows(own, honest)
    return own.clone()


@dataclass
class SignFlipKeys:
    scale: float = key(4.0, "sign_flip sends −scale × the mean of the honest vectors", gt=0)


@ATTACKS.register("sign_flip", keys=SignFlipKeys)
def sign_flip(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int, *, scale: float = 4.0) -> torch.Tensor:
    """−scale · mean(honest)."""
    return -scale * _mean(own, honest)


@dataclass
class IPMKeys:
    epsilon: float = key(0.1, "ipm sends −epsilon × the mean of the honest vectors", gt=0)


@ATTACKS.register("ipm", keys=IPMKeys)
def ipm(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int, *, epsilon: float = 0.1) -> torch.Tensor:
    """Inner product manipulation (Xie et al. 2020): −epsilon · mean(honest)."""
    return -epsilon * _mean(own, honest)


@dataclass
class ALIEKeys:
    z: Optional[float] = key(None, "alie sends mean − z·std per coordinate (default: the paper's z_max from n and f)")


@ATTACKS.register("alie", keys=ALIEKeys)
def alie(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int, *, z: Optional[float] = None) -> torch.Tensor:
    """A Little Is Enough (Baruch et al. 2019): mean − z·std, per coordinate over the
    honest vectors, std the sample estimator (Bessel, k − 1; ``torch.std``'s default).
    With k < 2 the estimate is over ``own`` and the honest vector (``own`` alone: the
    result is ``own``). z defaults to `alie_z(n, f)`."""
    if z is None:
        z = alie_z(n, f)
    rows = _rows(own, honest)
    if rows.shape[0] < 2:
        rows = torch.cat([own.reshape(1, -1).to(rows.dtype), rows])
        if rows.shape[0] < 2:
            return own.clone()
    return rows.mean(0) - z * rows.std(0, correction=1)


@dataclass
class GaussianKeys:
    sigma: float = key(1.0, "gaussian noise standard deviation", gt=0)
    around_mean: bool = key(True, "gaussian adds the noise to the honest mean (false: sends the noise alone)")


@ATTACKS.register("gaussian", keys=GaussianKeys)
def gaussian(own: torch.Tensor, honest: torch.Tensor, rng: Optional[torch.Generator], n: int, f: int, *,
             sigma: float = 1.0, around_mean: bool = True) -> torch.Tensor:
    """mean(honest) + N(0, sigma²) i.i.d. per coordinate, or N(0, sigma²) alone when
    ``around_mean`` is false; the noise is drawn from `rng` (on rng's device, then moved to
    own's), so a seeded rng gives the same vector."""
    mean = _mean(own, honest)
    device = rng.device if rng is not None else own.device
    noise = torch.randn(own.shape, generator=rng, dtype=own.dtype, device=device).to(own.device)
    return mean + sigma * noise if around_mean else sigma * noise


@ATTACKS.register("inf")
def all_inf(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int) -> torch.Tensor:
    """+inf in every coordinate."""
    _rows(own, honest)
    return torch.full_like(own, math.inf)


@ATTACKS.register("nan")
def all_nan(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int) -> torch.Tensor:
    """NaN in every coordinate."""
    _rows(own, honest)
    return torch.full_like(own, math.nan)


@dataclass
class MimicKeys:
    target: int = key(0, "mimic copies this honest row (modulo the number k of honest rows)", ge=0)


@ATTACKS.register("mimic", keys=MimicKeys)
def mimic(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int, *, target: int = 0) -> torch.Tensor:
    """A copy of honest row ``target % k`` (a node's neighbour count varies, so an index
    past the end wraps rather than fails); ``own`` when k = 0."""
    rows = _rows(own, honest)
    return rows[int(target) % rows.shape[0]].clone()


@ATTACKS.register("label_flip")
def label_flip(own: torch.Tensor, honest: torch.Tensor, rng, n: int, f: int) -> torch.Tensor:
    """A data attack: the vector is ``own`` unchanged; the node trains on `flip_labels`."""
    _rows(own, honest)
    return own.clone()


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class c → num_classes − 1 − c (0 ↔ 9 for 10 classes); an involution."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return num_classes - 1 - y
