"""Synthetic vibration of rotating machines: healthy, imbalance, bearing defects, looseness.

Physics-shaped enough that a model trained on it learns the signatures a vibration analyst looks
for, not artefacts of the generator:

- every machine runs at its own shaft speed (``AssetParams.shaft_hz``) that wanders slowly by a few
  percent; the shaft angle integrates the instantaneous speed, so it stays continuous when the
  speed changes and across :meth:`AssetSignal.next_block` calls;
- healthy: a small residual 1x (no rotor is perfectly balanced), the blade/vane-pass tone, a
  neighbouring machine's tone coming through the floor and broadband sensor/process noise;
- imbalance: a strong 1x on the radial axes, x and y 90 degrees apart (the force vector rotates
  with the shaft), growing with the square of the speed, little of it axially;
- bearing outer-race defect: an impact each time a ball passes the defect, at
  ``BPFO = n_balls / 2 * (1 - d/D * cos(contact angle)) * shaft speed`` with a little slip, each
  ringing the structure's resonance (250-400 Hz, per asset), so the spectrum shows the resonance
  band and the envelope shows BPFO and its harmonics;
- looseness: the machine foot rocks once per revolution with a half-order (0.5x) component and hits
  its base, so the response is truncated (clipped), rich in harmonics up to ~8x, mostly on the
  vertical axis and different from one revolution to the next;
- bearing inner-race defect (*not* among the example model's classes, ``UNSEEN_CONDITIONS``): the
  defect turns with the shaft, so balls strike it at
  ``BPFI = n_balls / 2 * (1 + d/D * cos(contact angle)) * shaft speed`` (about 5.4x, against
  BPFO's 3.6x) and each impact's size depends on where the defect is in the fixed load zone: the
  impacts are amplitude-modulated once per revolution (1x sidebands around BPFI in the envelope),
  and they reach the sensor through the balls and the outer race, weaker than an outer-race
  defect's. It rings the same resonance.

The example model is trained on ``CONDITIONS``; ``bearing_inner_race`` exists so the plant can
develop a fault the model never saw (docs/monitoring.md, Closing the loop).

Axes: x horizontal radial, y vertical radial, z axial; values in g (``FEATURES``). A severity in
[0, 1] scales the fault amplitude. Each asset also has a bearing/housing temperature that follows
a first-order lag towards ambient + running rise + a few degrees more as a fault grows.

Two entry points share one vectorised renderer: :class:`AssetSignal` streams one asset block by
block (the plant simulator), :func:`make_dataset` renders thousands of independent random assets
at once (the example model's training data). NumPy only: the gateway imports this module too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "CONDITIONS",
    "DEFAULT_SEVERITY_RANGE",
    "FEATURES",
    "SAMPLE_RATE_HZ",
    "UNSEEN_CONDITIONS",
    "AssetParams",
    "AssetSignal",
    "Condition",
    "make_dataset",
]

SAMPLE_RATE_HZ = 1000.0
"""Default sample rate of the accelerometer."""

FEATURES: tuple[tuple[str, str], ...] = (("accel_x", "g"), ("accel_y", "g"), ("accel_z", "g"))
"""(name, unit) of each axis in the order of the last dimension of every block."""


class Condition(str, Enum):
    """The machine's state; a fault's amplitude comes from the severity set with it."""

    HEALTHY = "healthy"
    IMBALANCE = "imbalance"
    BEARING_OUTER_RACE = "bearing_outer_race"
    LOOSENESS = "looseness"
    BEARING_INNER_RACE = "bearing_inner_race"


CONDITIONS: tuple[Condition, ...] = (
    Condition.HEALTHY,
    Condition.IMBALANCE,
    Condition.BEARING_OUTER_RACE,
    Condition.LOOSENESS,
)
"""The conditions the example model was trained on: the label order of :func:`make_dataset` (by
default) and of the example model's outputs."""

UNSEEN_CONDITIONS: tuple[Condition, ...] = (Condition.BEARING_INNER_RACE,)
"""Conditions the plant can develop that the shipped example model never saw: a new class for a
retrained model (``floorline.converter.examples.pdm --extra-data``)."""

DEFAULT_SEVERITY_RANGE: tuple[float, float] = (0.3, 1.0)
"""Fault severities :func:`make_dataset` draws by default, and so the only ones the example model
saw in training (``floorline.converter.examples.pdm`` keeps the default): a fault weaker than the
lower bound is outside what it learnt, and mostly reads healthy."""

# Render codes: the trained conditions keep their label indices, the unseen ones follow.
_CODE = {condition: code for code, condition in enumerate((*CONDITIONS, *UNSEEN_CONDITIONS))}
_HEALTHY, _IMBALANCE, _BEARING, _LOOSENESS, _INNER = range(len(_CODE))

# Share of AssetParams.fault_rise_c each fault reaches at full severity: a damaged bearing heats
# most (friction at the contact), imbalance loads the bearings, looseness barely heats.
_HEAT = np.array([0.0, 0.6, 1.0, 0.3, 1.0])

# An inner-race impact travels through a ball and the outer race to the housing: the share of
# bearing_g that reaches the sensor at the load zone's centre.
_INNER_TRANSMISSION = 0.7
# Load-zone modulation of inner-race impacts: size = floor + (1 - floor) * ((1 + cos) / 2) ** k,
# the cosine of the defect's angle from the load zone's centre. A floor of 0.05-0.3 (the load
# zone covers about half a turn; outside it the ball barely touches) and k of 1.5 give the
# textbook envelope: BPFI with sidebands at +-1x.
_INNER_FLOOR = (0.05, 0.3)
_INNER_LOAD_EXPONENT = 1.5

# Per-sample relative speed jitter; it integrates into a small random walk of the shaft angle,
# so no two revolutions are exactly alike.
_SPEED_JITTER = 0.002
# Second component of the speed wander, at a period incommensurate with the first so the drift
# never repeats exactly.
_DRIFT_SECOND_PERIOD = 0.31
_DRIFT_SECOND_SHARE = 0.3
# How much one bearing impact's size, and one looseness landing height (in units of the rocking
# amplitude), vary from the next.
_IMPACT_SPREAD = 0.2
_LANDING_SPREAD = 0.1
# Noise on the axial axis relative to the radial ones: axial sensors see less process noise.
_AXIS_NOISE = np.array([1.0, 1.0, 0.8])
# Rendered and thrown away before each dataset window, so the resonance rings from impacts that
# happened before the window starts, as it would on a running machine (5 time constants of the
# slowest decay the random assets have).
_PRE_ROLL_S = 0.12

_INT_FIELDS = frozenset({"n_balls", "vane_count"})


@dataclass(frozen=True)
class AssetParams:
    """The physical constants of one machine and its sensor mounting.

    Amplitudes are in g at severity 1 (faults) or always present (healthy content).
    """

    shaft_hz: float = 25.0
    """Nominal running speed (1x)."""
    speed_drift: float = 0.02
    """Peak relative slow wander of the speed (load, supply), e.g. 0.02 for +-2 %."""
    drift_period_s: float = 60.0
    """Period of the main speed wander component."""
    resonance_hz: float = 320.0
    """Structural resonance the bearing impacts excite; must lie below Nyquist."""
    damping_ratio: float = 0.05
    """Damping of that resonance: how fast each impact's ringing dies away."""
    n_balls: int = 9
    """Rolling elements in the bearing."""
    ball_pitch_ratio: float = 0.22
    """Ball diameter over pitch diameter."""
    contact_angle_deg: float = 0.0
    """Bearing contact angle."""
    bearing_slip: float = 0.02
    """Random timing spread of impacts as a fraction of the BPFO period (balls slip)."""
    noise_g: float = 0.03
    """Broadband noise std on each radial axis (independent per axis)."""
    residual_g: float = 0.02
    """Residual 1x of a healthy, well balanced rotor."""
    vane_count: int = 6
    """Blades, vanes or gear teeth on the shaft: the pass tone is at vane_count x shaft speed."""
    vane_g: float = 0.015
    """Amplitude of the pass tone."""
    neighbour_hz: float = 100.0
    """Frequency of a neighbouring machine coming through the floor, unrelated to this shaft."""
    neighbour_g: float = 0.01
    """Amplitude of that neighbour tone."""
    imbalance_g: float = 0.5
    """1x amplitude of a full-severity imbalance at nominal speed."""
    bearing_g: float = 1.0
    """Peak of the ringing each full-severity impact excites."""
    looseness_g: float = 0.5
    """Amplitude of full-severity rocking on the vertical axis."""
    ambient_c: float = 25.0
    """Ambient temperature."""
    running_rise_c: float = 12.0
    """Steady temperature rise above ambient of the healthy running machine."""
    fault_rise_c: float = 5.0
    """Further rise at full severity of the hottest fault."""
    thermal_tau_s: float = 300.0
    """Time constant of the housing temperature."""

    def __post_init__(self) -> None:
        positive = ("shaft_hz", "resonance_hz", "drift_period_s", "thermal_tau_s", "n_balls")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"AssetParams.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.damping_ratio < 1:
            raise ValueError(
                f"AssetParams.damping_ratio must be in (0, 1), got {self.damping_ratio}"
            )
        if not 0 < self.ball_pitch_ratio < 1:
            raise ValueError(
                f"AssetParams.ball_pitch_ratio must be in (0, 1), got {self.ball_pitch_ratio}"
            )
        non_negative = (
            "speed_drift", "bearing_slip", "noise_g", "residual_g", "vane_count", "vane_g",
            "neighbour_hz", "neighbour_g", "imbalance_g", "bearing_g", "looseness_g",
            "fault_rise_c",
        )  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"AssetParams.{name} must be >= 0, got {getattr(self, name)}")
        if self.speed_drift >= 1:
            raise ValueError("AssetParams.speed_drift must be < 1: the shaft would stop")

    @property
    def bpfo_order(self) -> float:
        """Ball pass frequency of the outer race as a multiple of shaft speed (about 3.5)."""
        return float(_bpfo_order(self.n_balls, self.ball_pitch_ratio, self.contact_angle_deg))

    @property
    def bpfo_hz(self) -> float:
        """Ball pass frequency of the outer race at nominal speed."""
        return self.bpfo_order * self.shaft_hz

    @property
    def bpfi_order(self) -> float:
        """Ball pass frequency of the inner race as a multiple of shaft speed (about 5.4)."""
        return float(_bpfi_order(self.n_balls, self.ball_pitch_ratio, self.contact_angle_deg))

    @property
    def bpfi_hz(self) -> float:
        """Ball pass frequency of the inner race at nominal speed."""
        return self.bpfi_order * self.shaft_hz

    @classmethod
    def random(cls, rng: np.random.Generator) -> AssetParams:
        """Draw a plausible machine: 15-35 Hz, resonance 250-400 Hz, a 9-ball bearing, ..."""
        table = _sample_table(rng, 1)
        values: dict[str, float | int] = {}
        for name, column in table.items():
            values[name] = int(column[0]) if name in _INT_FIELDS else float(column[0])
        return cls(**values)  # type: ignore[arg-type]  # each field gets its own type above


_Table = dict[str, NDArray[np.float64]]
"""AssetParams of many assets, one array per field: what the vectorised renderer reads."""


def _sample_table(rng: np.random.Generator, n: int) -> _Table:
    # The one place the random ranges live: AssetParams.random and make_dataset both use it.
    u = rng.uniform
    return {
        "shaft_hz": u(15.0, 35.0, n),
        "speed_drift": u(0.01, 0.04, n),
        "drift_period_s": u(20.0, 120.0, n),
        "resonance_hz": u(250.0, 400.0, n),
        "damping_ratio": u(0.03, 0.08, n),
        "n_balls": np.full(n, 9.0),
        "ball_pitch_ratio": u(0.20, 0.25, n),
        "contact_angle_deg": u(0.0, 15.0, n),
        "bearing_slip": u(0.01, 0.03, n),
        "noise_g": u(0.02, 0.08, n),
        "residual_g": u(0.01, 0.06, n),
        "vane_count": rng.integers(3, 10, n).astype(np.float64),
        "vane_g": u(0.005, 0.05, n),
        "neighbour_hz": u(40.0, 180.0, n),
        "neighbour_g": u(0.0, 0.06, n),
        "imbalance_g": u(0.2, 0.6, n),
        "bearing_g": u(0.4, 1.0, n),
        "looseness_g": u(0.2, 0.5, n),
        "ambient_c": u(18.0, 32.0, n),
        "running_rise_c": u(8.0, 20.0, n),
        "fault_rise_c": u(3.0, 8.0, n),
        "thermal_tau_s": u(120.0, 600.0, n),
    }


def _table_of(params: Sequence[AssetParams]) -> _Table:
    return {
        f.name: np.array([float(getattr(p, f.name)) for p in params]) for f in fields(AssetParams)
    }


def _bpfo_order(
    n_balls: NDArray[np.float64] | float,
    ball_pitch_ratio: NDArray[np.float64] | float,
    contact_angle_deg: NDArray[np.float64] | float,
) -> NDArray[np.float64]:
    angle = np.deg2rad(contact_angle_deg)
    order: NDArray[np.float64] = np.asarray(
        np.multiply(n_balls, 0.5) * (1.0 - np.multiply(ball_pitch_ratio, np.cos(angle))),
        dtype=np.float64,
    )
    return order


def _bpfi_order(
    n_balls: NDArray[np.float64] | float,
    ball_pitch_ratio: NDArray[np.float64] | float,
    contact_angle_deg: NDArray[np.float64] | float,
) -> NDArray[np.float64]:
    # BPFO + BPFI = n_balls x shaft speed: the balls pass both races, at rates relative to each.
    out: NDArray[np.float64] = np.multiply(n_balls, 1.0) - _bpfo_order(
        n_balls, ball_pitch_ratio, contact_angle_deg
    )
    return out


class _Bank:
    """Any number of independent assets rendered together; state carries across render calls."""

    def __init__(
        self, table: _Table, rng: np.random.Generator, sample_rate_hz: float, *, random_time: bool
    ) -> None:
        if not sample_rate_hz > 0:
            raise ValueError(f"sample rate must be > 0, got {sample_rate_hz}")
        nyquist = sample_rate_hz / 2
        if np.any(table["resonance_hz"] >= nyquist) or np.any(table["neighbour_hz"] >= nyquist):
            raise ValueError(
                f"resonance and neighbour frequencies must be below Nyquist ({nyquist:g} Hz)"
            )
        self.p = table
        self.fs = sample_rate_hz
        self.rng = rng
        n = len(table["shaft_hz"])
        u = rng.uniform
        two_pi = 2 * np.pi

        # Mounting and fault geometry: fixed per asset but not worth a public parameter each.
        self.phase = u(0.0, two_pi, (n, 8))
        self.imbalance_y = u(0.6, 1.4, n)  # anisotropic support stiffness
        self.imbalance_z = u(0.05, 0.2, n)
        self.loose_sub = u(0.3, 0.6, n)  # 0.5x share of the rocking
        self.loose_clip = u(0.2, 0.6, n)  # where the rocking foot hits its base
        self.loose_x = u(0.2, 0.7, n)
        self.loose_knock = u(0.5, 1.0, n)  # knock size relative to the rocking
        self.loose_thud_s = u(0.001, 0.003, n)
        self.loose_offset = np.full(n, np.nan)  # filled in when an asset first goes loose
        wn = two_pi * table["resonance_hz"]
        zeta = table["damping_ratio"]
        self.ring_pole = -zeta * wn + 1j * wn * np.sqrt(1 - zeta**2)
        # Reading the ringing through pole/|pole| makes each impact's response integrate to zero,
        # as acceleration must (the structure ends where it started). A zero-mean response leaves
        # only a sign and a gain to differ between axes.
        self.ring_view = self.ring_pole / np.abs(self.ring_pole)
        sign = rng.choice([-1.0, 1.0], (n, 2))
        self.ring_y = sign[:, 0] * u(0.5, 0.9, n)
        self.ring_z = sign[:, 1] * u(0.2, 0.5, n)
        self.bpfo_order = _bpfo_order(
            table["n_balls"], table["ball_pitch_ratio"], table["contact_angle_deg"]
        )
        self.bpfi_order = _bpfi_order(
            table["n_balls"], table["ball_pitch_ratio"], table["contact_angle_deg"]
        )
        # Drawn when an asset first develops an inner-race defect (not here): the trained
        # conditions' random streams, and so every dataset and simulated plant made before this
        # condition existed, stay exactly as they were.
        self.inner_load = np.full(n, np.nan)  # load zone's angle relative to the shaft's phase
        self.inner_floor = np.full(n, np.nan)

        # Dynamic state.
        self.t = u(0.0, 1.0, n) * table["drift_period_s"] if random_time else np.zeros(n)
        self.cycles = u(0.0, 2.0, n)  # shaft revolutions modulo 2, so the 0.5x stays continuous
        self.defect = u(0.0, 1.0, n)  # fraction of the way to the next ball pass
        self.ring = np.zeros(n, dtype=np.complex128)
        self.revolution = rng.standard_normal(n)  # this revolution's looseness variation
        self.loose_landed = np.zeros(n, dtype=bool)
        self.loose_since = np.full(n, 1e9)  # samples since the foot last landed
        self.speed_hz = table["shaft_hz"].copy()
        self.temperature = table["ambient_c"] + table["running_rise_c"]
        self.condition = np.zeros(n, dtype=np.int64)
        self.severity = np.zeros(n)

    def render(self, n: int, *, compose: bool = True) -> NDArray[np.float64]:
        """Advance every asset by N samples; return them, shape (assets, N, 3), in g.

        With COMPOSE false only the state advances (the result is zeros): a cheap warm-up for the
        one part of the signal with memory, the bearing resonance.
        """
        p, fs, rng = self.p, self.fs, self.rng
        count = len(self.speed_hz)
        if n == 0:
            return np.zeros((count, 0, 3))
        # One contiguous (assets, N) plane per axis: every term below adds to whole planes.
        axes = np.zeros((3, count, n))
        t = self.t[:, None] + np.arange(1, n + 1) / fs
        period = p["drift_period_s"][:, None]
        drift = (1 - _DRIFT_SECOND_SHARE) * np.sin(2 * np.pi * t / period + self.phase[:, 0:1])
        drift += _DRIFT_SECOND_SHARE * np.sin(
            2 * np.pi * t / (_DRIFT_SECOND_PERIOD * period) + self.phase[:, 1:2]
        )
        speed = p["shaft_hz"][:, None] * (1 + p["speed_drift"][:, None] * drift)
        step = speed / fs * (1 + _SPEED_JITTER * rng.standard_normal((count, n)))
        # Integrating the instantaneous speed keeps the angle continuous whatever the speed does.
        cycles = self.cycles[:, None] + np.cumsum(step, axis=1)

        self._bearing(axes, step, cycles)
        if compose:
            theta = 2 * np.pi * cycles
            # Centrifugal force grows with the square of speed.
            force = (speed / p["shaft_hz"][:, None]) ** 2
            self._healthy(axes, t, theta, force)
            self._imbalance(axes, theta, force)
            self._looseness(axes, cycles, theta)
            noise = p["noise_g"][:, None] * rng.standard_normal((3, count, n))
            axes += noise * _AXIS_NOISE[:, None, None]

        self.t = t[:, -1]
        self.cycles = cycles[:, -1] % 2.0
        self.speed_hz = speed[:, -1]
        target = p["ambient_c"] + p["running_rise_c"]
        target = target + p["fault_rise_c"] * self.severity * _HEAT[self.condition]
        lag = np.exp(-n / fs / p["thermal_tau_s"])
        self.temperature = target + (self.temperature - target) * lag
        if not compose:
            return np.zeros((count, n, 3))
        samples: NDArray[np.float64] = np.ascontiguousarray(np.moveaxis(axes, 0, -1))
        return samples

    def _healthy(
        self,
        axes: NDArray[np.float64],
        t: NDArray[np.float64],
        theta: NDArray[np.float64],
        force: NDArray[np.float64],
    ) -> None:
        p = self.p
        residual = p["residual_g"][:, None] * force
        angle = theta + self.phase[:, 2:3]
        axes[0] += residual * np.cos(angle)
        axes[1] += residual * np.sin(angle)
        axes[2] += 0.2 * residual * np.cos(angle + self.phase[:, 7:8])
        vane = p["vane_g"][:, None] * np.cos(p["vane_count"][:, None] * theta + self.phase[:, 3:4])
        axes += vane * np.array([1.0, 0.6, 0.4])[:, None, None]
        neighbour = p["neighbour_g"][:, None] * np.sin(
            2 * np.pi * p["neighbour_hz"][:, None] * t + self.phase[:, 4:5]
        )
        axes += neighbour * np.array([0.7, 1.0, 0.5])[:, None, None]

    def _imbalance(
        self, axes: NDArray[np.float64], theta: NDArray[np.float64], force: NDArray[np.float64]
    ) -> None:
        rows = np.flatnonzero(self.condition == _IMBALANCE)
        if rows.size == 0:
            return
        amplitude = (self.severity[rows] * self.p["imbalance_g"][rows])[:, None] * force[rows]
        # Same rotating-force phase as the residual: the fault adds to the rotor's existing
        # unbalance rather than appearing somewhere else.
        angle = theta[rows] + self.phase[rows, 2:3]
        axes[0, rows] += amplitude * np.cos(angle)
        axes[1, rows] += amplitude * self.imbalance_y[rows, None] * np.sin(angle)
        axes[2, rows] += (
            amplitude * self.imbalance_z[rows, None] * np.cos(angle + self.phase[rows, 7:8])
        )

    def _rocking(self, rows: NDArray[np.intp], theta: NDArray[np.float64]) -> NDArray[np.float64]:
        # The free motion of the foot: 1x with a 0.5x share (it lands every other revolution
        # a little differently).
        rock: NDArray[np.float64] = np.cos(theta + self.phase[rows, 5:6])
        rock += self.loose_sub[rows, None] * np.cos(theta / 2 + self.phase[rows, 6:7])
        return rock

    def _looseness(
        self, axes: NDArray[np.float64], cycles: NDArray[np.float64], theta: NDArray[np.float64]
    ) -> None:
        rows = np.flatnonzero(self.condition == _LOOSENESS)
        if rows.size == 0:
            return
        new = rows[np.isnan(self.loose_offset[rows])]
        if new.size:
            # Truncation shifts the mean; an accelerometer is AC-coupled and never shows that
            # offset. Two revolutions cover the 0.5x too.
            grid = np.linspace(0.0, 4 * np.pi, 256, endpoint=False)[None, :]
            truncated = np.minimum(self._rocking(new, grid), self.loose_clip[new, None])
            self.loose_offset[new] = truncated.mean(axis=1)

        # Revolutions are counted from the bottom of the rocking, where the foot is always in the
        # air, so a new landing height never makes the waveform jump.
        lift = self.phase[rows, 5] / (2 * np.pi) - 0.5
        start = np.floor(self.cycles[rows] + lift)
        revolution = (np.floor(cycles[rows] + lift[:, None]) - start[:, None]).astype(np.int64)
        # One draw per revolution begun in this block; column 0 continues the current revolution.
        draws = self.rng.standard_normal((rows.size, int(revolution.max()) + 1))
        draws[:, 0] = self.revolution[rows]
        variation = np.take_along_axis(draws, revolution, axis=1)
        self.revolution[rows] = variation[:, -1]
        # The base stops the foot: the response is truncated where it lands.
        clip = self.loose_clip[rows, None] + _LANDING_SPREAD * variation
        rock = self._rocking(rows, theta[rows])
        response = np.minimum(rock, clip) - self.loose_offset[rows, None]

        # Each landing knocks: a short thud (1 - c*s) exp(-s), s in samples over its duration,
        # c making its sampled sum zero (AC-coupled again). The knocks spread looseness over
        # many harmonics.
        landed = rock >= clip
        previous = np.concatenate([self.loose_landed[rows, None], landed[:, :-1]], axis=1)
        index = np.arange(rock.shape[1])
        last = np.maximum.accumulate(np.where(landed & ~previous, index, -1), axis=1)
        since = np.where(last >= 0, index - last, self.loose_since[rows, None] + index + 1)
        self.loose_landed[rows] = landed[:, -1]
        self.loose_since[rows] = since[:, -1]
        h = 1 / (self.loose_thud_s[rows, None] * self.fs)
        q = np.exp(-h)
        s = since * h
        response += self.loose_knock[rows, None] * (1 - (1 - q) / q * since) * np.exp(-s)

        response *= (self.severity[rows] * self.p["looseness_g"][rows])[:, None]
        axes[1, rows] += response
        axes[0, rows] += self.loose_x[rows, None] * response
        axes[2, rows] += 0.15 * response

    def _bearing(
        self, axes: NDArray[np.float64], step: NDArray[np.float64], cycles: NDArray[np.float64]
    ) -> None:
        # Outer- and inner-race defects: the same impacts ringing the same resonance; the inner
        # race's come at BPFI, modulated by the load zone.
        rows = np.flatnonzero((self.condition == _BEARING) | (self.condition == _INNER))
        ringing = np.zeros(len(self.ring), dtype=bool)
        ringing[rows] = True
        # A machine that is no longer faulty stops ringing; a later fault starts from rest.
        self.ring[~ringing] = 0
        if rows.size == 0:
            return
        inner = self.condition[rows] == _INNER
        fresh = rows[inner & np.isnan(self.inner_load[rows])]
        if fresh.size:
            self.inner_load[fresh] = self.rng.uniform(0.0, 2 * np.pi, fresh.size)
            self.inner_floor[fresh] = self.rng.uniform(*_INNER_FLOOR, fresh.size)
        fs = self.fs
        order = np.where(inner, self.bpfi_order[rows], self.bpfo_order[rows])
        samples_per_pass = fs / (order * self.p["shaft_hz"][rows])
        # Per-sample rate noise whose random walk spreads each pass by bearing_slip of a period.
        sigma = self.p["bearing_slip"][rows] * np.sqrt(samples_per_pass)
        n = step.shape[1]
        rate = order[:, None] * step[rows]
        rate *= np.maximum(1 + sigma[:, None] * self.rng.standard_normal((rows.size, n)), 0.0)
        passes = self.defect[rows, None] + np.cumsum(rate, axis=1)
        previous = np.concatenate([self.defect[rows, None], passes[:, :-1]], axis=1)
        impact = np.floor(passes) > np.floor(previous)
        # Time since the impact in samples, so impacts fall between samples like real ones do.
        since = np.where(impact, (passes - np.floor(passes)) / np.where(impact, rate, 1.0), 0.0)
        size = (self.severity[rows] * self.p["bearing_g"][rows])[:, None] * (
            1 + _IMPACT_SPREAD * self.rng.standard_normal((rows.size, n))
        )
        if inner.any():
            size[inner] *= self._load_zone(rows[inner], cycles[rows[inner]])
        pole = self.ring_pole[rows]
        kick = np.where(impact, size * np.exp(pole[:, None] * since / fs), 0.0)
        # The resonance as a complex one-pole filter: each impact leaves a decaying rotation.
        # Sequential in time only; every asset advances together.
        decay = np.exp(pole / fs)
        state = self.ring[rows]
        ring = np.empty((rows.size, n), dtype=np.complex128)
        for k in range(n):
            state = state * decay + kick[:, k]
            ring[:, k] = state
        self.ring[rows] = state
        self.defect[rows] = passes[:, -1] % 1.0
        response = (ring * self.ring_view[rows, None]).imag
        axes[0, rows] += response
        axes[1, rows] += self.ring_y[rows, None] * response
        axes[2, rows] += self.ring_z[rows, None] * response


    def _load_zone(
        self, rows: NDArray[np.intp], cycles: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        # Where the turning defect is relative to the fixed load zone, as an impact-size factor.
        cos = np.cos(2 * np.pi * cycles + self.inner_load[rows, None])
        floor = self.inner_floor[rows, None]
        share: NDArray[np.float64] = _INNER_TRANSMISSION * (
            floor + (1 - floor) * (0.5 * (1 + cos)) ** _INNER_LOAD_EXPONENT
        )
        return share


class AssetSignal:
    """One machine's accelerometer, streamed block by block with continuous phase.

    Holds ``rng`` and draws all its noise from it, so a seeded generator replays the same stream.
    Starts healthy; :meth:`set_condition` switches the fault (and its severity) at any time.
    """

    def __init__(
        self,
        params: AssetParams,
        rng: np.random.Generator,
        sample_rate_hz: float = SAMPLE_RATE_HZ,
    ) -> None:
        self._params = params
        self._bank = _Bank(_table_of([params]), rng, sample_rate_hz, random_time=False)
        self._condition = Condition.HEALTHY

    @property
    def params(self) -> AssetParams:
        """The machine's constants."""
        return self._params

    @property
    def sample_rate_hz(self) -> float:
        """Samples per second of :meth:`next_block`."""
        return self._bank.fs

    @property
    def condition(self) -> Condition:
        """The current condition."""
        return self._condition

    @property
    def severity(self) -> float:
        """The current fault severity in [0, 1]; 0 while healthy."""
        return float(self._bank.severity[0])

    @property
    def speed_hz(self) -> float:
        """Shaft speed at the last sample produced (nominal before the first block)."""
        return float(self._bank.speed_hz[0])

    def set_condition(self, condition: Condition, severity: float = 1.0) -> None:
        """Switch to CONDITION at SEVERITY (0..1, ignored for healthy) from the next sample on."""
        condition = Condition(condition)
        if not 0.0 <= severity <= 1.0:
            raise ValueError(f"severity must be in [0, 1], got {severity}")
        self._condition = condition
        self._bank.condition[0] = _CODE[condition]
        self._bank.severity[0] = 0.0 if condition is Condition.HEALTHY else severity

    def next_block(self, n: int) -> NDArray[np.float32]:
        """Return the next N samples, (N, 3) in g, continuing exactly where the last block ended."""
        if n < 0:
            raise ValueError(f"block length must be >= 0, got {n}")
        block: NDArray[np.float32] = self._bank.render(n)[0].astype(np.float32)
        return block

    def temperature_c(self) -> float:
        """Housing temperature in degC at the end of the last block."""
        return float(self._bank.temperature[0])

    def __repr__(self) -> str:
        return (
            f"AssetSignal({self._condition.value}, severity={self.severity:.2f}, "
            f"shaft={self.speed_hz:.2f} Hz, {asdict(self._params)})"
        )


def make_dataset(
    n_per_class: int,
    window: int,
    rng: np.random.Generator,
    severity_range: tuple[float, float] = DEFAULT_SEVERITY_RANGE,
    *,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
    conditions: Sequence[Condition] = CONDITIONS,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Labelled windows: x (N, WINDOW, 3) in g and y (N,) indexing CONDITIONS, shuffled.

    N = N_PER_CLASS * len(CONDITIONS), balanced; CONDITIONS defaults to the example model's
    classes (``CONDITIONS``). Every window comes from a fresh random asset
    (:meth:`AssetParams.random` ranges) at a random point of its speed wander and shaft angle;
    faults get a severity drawn uniformly from SEVERITY_RANGE.
    """
    if n_per_class < 1 or window < 1:
        raise ValueError(f"n_per_class and window must be >= 1, got {n_per_class}, {window}")
    low, high = severity_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"severity_range must satisfy 0 <= low <= high <= 1, got {severity_range}")
    codes = np.array([_CODE[Condition(c)] for c in conditions], dtype=np.int64)
    if codes.size == 0 or len(set(codes.tolist())) != codes.size:
        raise ValueError(f"conditions must be distinct and at least one, got {list(conditions)}")
    labels = np.repeat(np.arange(len(codes), dtype=np.int64), n_per_class)
    rng.shuffle(labels)
    bank = _Bank(_sample_table(rng, labels.size), rng, sample_rate_hz, random_time=True)
    bank.condition[:] = codes[labels]
    healthy = bank.condition == _HEALTHY
    bank.severity[:] = np.where(healthy, 0.0, rng.uniform(low, high, labels.size))
    bank.render(math.ceil(_PRE_ROLL_S * sample_rate_hz), compose=False)
    return bank.render(window).astype(np.float32), labels
