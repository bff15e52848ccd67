"""Signal features of raw windows: the bundle's feature stage, one implementation for both sides.

A bundle may declare a feature stage (``input.preprocessing`` in the manifest): the gateway's
windows stay raw sensor samples ``(window, channels)``, and this module turns a batch of them into
the feature vector the model was trained on, before the model's normalization. The converter
computes calibration and parity inputs through the same function, so what was checked at
conversion is exactly what runs on the gateway. numpy only (a gateway has no scipy), vectorised
over the batch; computed in float64 and cast to float32 at the end, so a window's features do not
depend on the batch it came in.

Definitions (x: one channel of one window, N samples, sample rate fs):

- ``rms`` = sqrt(mean(x²)); ``peak`` = max |x|; ``crest`` = peak / rms (0 for an all-zero window).
- ``kurtosis`` = m4 / m2² (Pearson's, not excess: a sine 1.5, Gaussian noise 3) and ``skewness``
  = m3 / m2^1.5, with central moments m_k. A constant window (variance at most (1e-12 · max|x|)²,
  so float rounding of a constant counts as constant) has no shape: both are defined as **0**.
  0 is outside what any non-constant signal gives for kurtosis (always ≥ 1), so a stuck sensor
  stands out instead of passing for calm noise (which 3 would).
- ``bands``: energy of the one-sided spectrum (rfft, no taper) in [lo, hi) Hz, scaled so the
  bands of the whole spectrum add up to mean(x²): a sine of amplitude A on a bin has energy A²/2.
  The DC bin is at 0 Hz: start bands above 0 to leave a sensor's offset out. A band ending at
  Nyquist includes the Nyquist bin.
- ``envelope``: band-pass x to [lo, hi) Hz (FFT mask), Hilbert envelope |analytic signal| (FFT),
  its mean removed, then band energies of the envelope's spectrum as above: bearing faults
  modulate a structural resonance at their defect frequency, which shows up here.
- ``order_bands``: band energies as above with bands in orders of the shaft speed: [lo, hi)
  orders are [lo·f, hi·f) Hz with f the window's mean speed channel in rev/s. A window whose
  speed is not > 0 (stopped, or invalid) has 0 in every order band; the part of a band above
  Nyquist contributes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # the manifest imports this module to name features: no cycle at run time
    from floorline.edge.bundle.manifest import FeatureBlock, FeatureStage

STATS = ("rms", "peak", "crest", "kurtosis", "skewness")
"""Per-channel statistics, in the order a ``stats`` block without ``stats:`` computes them."""

_CONSTANT = 1e-12
"""Relative variance below which a window counts as constant (see the module docstring)."""

_RPM = 1.0 / 60.0


def _num(value: float) -> str:
    return f"{value:g}"


def block_channels(block: FeatureBlock, channels: Sequence[str], speed: str | None) -> list[str]:
    """The raw channels BLOCK reads: its own list, or every channel but the speed channel."""
    if block.channels is not None:
        return list(block.channels)
    return [c for c in channels if c != speed]


def feature_names(stage: FeatureStage, channels: Sequence[str]) -> list[str]:
    """The names of the features STAGE computes from windows of CHANNELS, in output order."""
    speed = stage.speed.channel if stage.speed is not None else None
    names: list[str] = []
    for block in stage.blocks:
        for ch in block_channels(block, channels, speed):
            if block.type == "stats":
                names += [f"{ch}_{s}" for s in (block.stats or STATS)]
            elif block.type == "bands":
                names += [f"{ch}_band_{_num(lo)}_{_num(hi)}hz" for lo, hi in block.bands or []]
            elif block.type == "envelope":
                lo_c, hi_c = block.band or (0.0, 0.0)
                names += [
                    f"{ch}_env_{_num(lo_c)}_{_num(hi_c)}hz_band_{_num(lo)}_{_num(hi)}hz"
                    for lo, hi in block.bands or []
                ]
            else:  # order_bands
                names += [f"{ch}_order_{_num(lo)}_{_num(hi)}" for lo, hi in block.bands or []]
    return names


def _stats(x: NDArray[np.float64], which: Sequence[str]) -> NDArray[np.float64]:
    """(n, c, N) → (n, c, len(which))."""
    out: dict[str, NDArray[np.float64]] = {}
    ms = np.mean(x * x, axis=-1)
    rms = np.sqrt(ms)
    peak = np.max(np.abs(x), axis=-1)
    out["rms"], out["peak"] = rms, peak
    with np.errstate(divide="ignore", invalid="ignore"):
        out["crest"] = np.where(rms > 0, peak / np.where(rms > 0, rms, 1.0), 0.0)
    if "kurtosis" in which or "skewness" in which:
        d = x - np.mean(x, axis=-1, keepdims=True)
        d2 = d * d  # products, not d**4: a general power is ~20x slower per element
        m2 = np.mean(d2, axis=-1)
        constant = m2 <= (_CONSTANT * peak) ** 2
        safe = np.where(constant, 1.0, m2)
        out["kurtosis"] = np.where(constant, 0.0, np.mean(d2 * d2, axis=-1) / (safe * safe))
        out["skewness"] = np.where(constant, 0.0, np.mean(d2 * d, axis=-1) / safe**1.5)
    stacked: NDArray[np.float64] = np.stack([out[s] for s in which], axis=-1)
    return stacked


def _power(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """One-sided power per rfft bin, scaled so the bins sum to mean(x²): (n, c, N//2 + 1)."""
    size = x.shape[-1]
    spec = np.fft.rfft(x, axis=-1)
    power = (spec.real**2 + spec.imag**2) / float(size * size)
    weight = np.full(power.shape[-1], 2.0)
    weight[0] = 1.0
    if size % 2 == 0:
        weight[-1] = 1.0  # the Nyquist bin has no mirror image
    out: NDArray[np.float64] = power * weight
    return out


def _band_mask(freqs: NDArray[np.floating[Any]], lo: Any, hi: Any, nyquist: float) -> Any:
    """Bins in [lo, hi), plus the Nyquist bin when the band ends there (lo, hi may be arrays)."""
    top = freqs < hi
    if isinstance(hi, float) and hi >= nyquist:
        top = freqs <= hi
    return (freqs >= lo) & top


def _band_energies(
    power: NDArray[np.float64], size: int, fs: float, bands: Sequence[tuple[float, float]]
) -> NDArray[np.float64]:
    """(n, c, bins) of windows of SIZE samples at FS → (n, c, len(bands))."""
    masks = _masks(tuple((float(lo), float(hi)) for lo, hi in bands), size, fs)
    # One product for every band; each (window, channel, band) row is summed along the last axis
    # on its own, as a per-band sum would be: the same bits, a fraction of the calls.
    energies: NDArray[np.float64] = np.sum(power[..., None, :] * masks, axis=-1)
    return energies


@functools.lru_cache(maxsize=64)
def _masks(bands: tuple[tuple[float, float], ...], size: int, fs: float) -> NDArray[np.float64]:
    """(len(bands), bins) 0/1 weights of the rfft bins in each band (cached per stage, window)."""
    freqs = np.fft.rfftfreq(size, d=1.0 / fs)
    out = np.stack([_band_mask(freqs, lo, hi, fs / 2) for lo, hi in bands]).astype(np.float64)
    out.flags.writeable = False
    return out


def _envelope(x: NDArray[np.float64], fs: float, band: tuple[float, float]) -> NDArray[np.float64]:
    """The Hilbert envelope of X band-passed to BAND, mean removed: (n, c, N)."""
    size = x.shape[-1]
    spec = np.fft.rfft(x, axis=-1)
    freqs = np.fft.rfftfreq(size, d=1.0 / fs)
    # The analytic signal's spectrum: positive frequencies doubled, negative ones zero; DC and
    # Nyquist (no mirror image) kept once. Applied only inside the band: band-pass and Hilbert
    # transform in one mask.
    gain = np.where(_band_mask(freqs, band[0], band[1], fs / 2), 2.0, 0.0)
    gain[0] *= 0.5
    if size % 2 == 0:
        gain[-1] *= 0.5
    full = np.zeros((*x.shape[:-1], size), dtype=np.complex128)
    full[..., : freqs.size] = spec * gain
    env = np.abs(np.fft.ifft(full, axis=-1))
    centred: NDArray[np.float64] = env - np.mean(env, axis=-1, keepdims=True)
    return centred


def _order_energies(
    power: NDArray[np.float64], freqs: NDArray[np.floating[Any]], shaft_hz: NDArray[np.float64],
    bands: Sequence[tuple[float, float]],
) -> NDArray[np.float64]:
    """(n, c, bins), shaft speed (n,) in Hz → (n, c, len(bands)); 0 where the speed is not > 0."""
    running = np.isfinite(shaft_hz) & (shaft_hz > 0)
    f = np.where(running, shaft_hz, 0.0)[:, None, None]  # (n, 1, 1)
    lo = np.array([b[0] for b in bands], dtype=np.float64)[None, :, None]  # (1, bands, 1)
    hi = np.array([b[1] for b in bands], dtype=np.float64)[None, :, None]
    masks = (freqs >= lo * f) & (freqs < hi * f) & running[:, None, None]  # (n, bands, bins)
    energies: NDArray[np.float64] = np.sum(power[:, :, None, :] * masks[:, None], axis=-1)
    return energies


def compute(
    windows: NDArray[np.floating[Any]], stage: FeatureStage, channels: Sequence[str]
) -> NDArray[np.float32]:
    """Features of a batch of raw WINDOWS (n, window, channels) → (n, features), float32.

    CHANNELS names the windows' last axis (the manifest's ``input.features``); the columns come
    out in ``feature_names`` order.
    """
    if windows.ndim != 3 or windows.shape[-1] != len(channels):
        raise ValueError(
            f"feature stage: windows {windows.shape} are not (n, window, {len(channels)})"
        )
    # (n, c, N), C-contiguous: every reduction runs along the last axis, window by window, so a
    # window's features are bit-identical whether it comes alone or in a batch.
    x = np.ascontiguousarray(np.swapaxes(windows.astype(np.float64), 1, 2))
    index = {c: i for i, c in enumerate(channels)}
    fs = float(stage.sample_rate)
    size = x.shape[-1]
    freqs = np.fft.rfftfreq(size, d=1.0 / fs)
    speed = stage.speed.channel if stage.speed is not None else None
    power_cache: dict[tuple[int, ...], NDArray[np.float64]] = {}
    parts: list[NDArray[np.float64]] = []
    for block in stage.blocks:
        picked = [index[c] for c in block_channels(block, channels, speed)]
        sub = x[:, picked, :]
        if block.type == "stats":
            part = _stats(sub, block.stats or STATS)
        elif block.type == "envelope":
            assert block.band is not None  # noqa: S101 - the manifest requires it
            env = _envelope(sub, fs, block.band)
            part = _band_energies(_power(env), size, fs, block.bands or [])
        else:
            key = tuple(picked)
            if key not in power_cache:
                power_cache[key] = _power(sub)
            power = power_cache[key]
            if block.type == "bands":
                part = _band_energies(power, size, fs, block.bands or [])
            else:
                assert stage.speed is not None  # noqa: S101 - the manifest requires it
                scale = _RPM if stage.speed.unit == "rpm" else 1.0
                shaft = np.mean(x[:, index[stage.speed.channel], :], axis=-1) * scale
                part = _order_energies(power, freqs, shaft, block.bands or [])
        parts.append(part.reshape(len(x), -1))  # channel-major, as feature_names
    return np.concatenate(parts, axis=-1).astype(np.float32)
