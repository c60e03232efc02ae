"""The Lava Processes of a spikecompile program: the phase neuron and the non-spiking ops (numpy + lava only).

Time: Lava step k = time_step − 1. Every process receives, then sends, once per step, so a value sent at step k
arrives at step k, except through Dense/Sparse, which send what they received one step earlier. Each input port
knows the step `start` at which its event step 0 arrives, its number of steps and a per-step gain g(t) (the
d(t) of the spike site behind it, see program.py); what arrives outside [start, start + steps) is ignored.

PhaseNeuronProcess (one spike site; spikes carry σ ∈ {−1, +1}, the receiver applies d(t)):
    integrate   u ← u + g(t_in)·a_t              while t_in = k − input_start ∈ [0, steps)
    start       σ = sign(u);  r = |u|            at k = fire_start (the step the last input arrives)
    fire        s_t = [r > θ'(t)] ∧ [K = 0 ∨ count < K];  r ← r − h(t)·s_t;  count ← count + s_t;  send σ·s_t
                                                                    t = k − fire_start ∈ [0, T)
with θ'(t) = θ(t) − v0, the threshold against the residual r = v − v0 (neuron.reference.magnitude_spikes), of
either sign (v0 < 0 raises it; v0 > θ(t) makes it negative), and K = max_spikes the spike budget: count, the
per-neuron spike counter, is Σ_{u<t} s_u when step t fires (a neuron fires one window per run).
A signed-digit site (signed_digits, the phase-sd coding) keeps the potential's sign: at start σ = 1, r = u; then
s_t = ([r > θ'(t)] − [−r > θ'(t)])·[K = 0 ∨ count < K] ∈ {−1, 0, +1}, r ← r − h(t)·s_t, count ← count + |s_t|,
send s_t (the ±1 graded payload), with θ'(t) = θ_sd(t) (neuron.reference.signed_spikes).
    floating_pt  u in float64, r, θ', h in float32: the decoded reference's arithmetic.
    fixed_pt     hardware.loihi2's formats: acc ← acc + a_t over the input window (exact integer synapse sums, or
                 one op message); at fire_start u = sat(rint(G·acc)) on the site's grid (unit τ·2^-F; G the
                 per-neuron gain, `scale`), sat clamping to ±limit (the 24-bit state), saturations counted; r, θ',
                 h integers; a spike carries the graded payload σ·D_t.

Op (a non-spiking IR node, one or two inputs; float64 in both tags). fixed_pt: the window rule, y = f(ΣX·scale, ...)
sent once when the last input has arrived (the host CPU's op, decoded). floating_pt: a running-sum event rule from
docs/method.md §3:
    per_step      y_t = f(t, x_t, ...)                              linear maps; a constant enters at t = 0
    differential  y_t = f(X_t) − f(X_{t−1}),  f(X_{−1}) = 0          rmsnorm, softmax, silu
    bilinear      y_t = f(A_t, b_t) + f(a_t, B_t) − f(a_t, b_t)      a⊙b, q·kᵀ, p·v
so Σ_t y_t = f(Σ_t x_t) for every rule.
"""

from __future__ import annotations

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol


class PhaseNeuronProcess(AbstractProcess):
    """The phase neurons of one spike site (equations in the module docstring).

    size: neurons; threshold θ'(t), reset h(t): [T]; gain g(t_in): [steps of the input]; input_start, fire_start:
    Lava steps; limit: the largest |u| of the fixed_pt state (ignored in floating_pt); max_spikes: the spike
    budget K (0: none); signed_digits: the signed-digit neuron (s_t ∈ {−1, 0, +1}).
    Vars: u (integrated input), r (residual potential), sign, count (spikes per neuron: the budget's counter),
    saturated (per neuron).
    """

    def __init__(self, *, size: int, threshold, reset, gain, input_start: int, fire_start: int, limit: int = 0,
                 max_spikes: int = 0, scale=None, payload=None, signed_digits: bool = False, name: str | None = None):
        super().__init__(size=size, input_start=input_start, fire_start=fire_start, limit=limit,
                         max_spikes=int(max_spikes), signed_digits=bool(signed_digits), name=name)
        self.a_in = InPort(shape=(size,))
        self.s_out = OutPort(shape=(size,))
        for var in ("u", "r", "sign", "count", "saturated", "acc"):
            setattr(self, var, Var(shape=(size,), init=0))
        self.scale = Var(shape=(size,), init=np.ones(size) if scale is None else np.asarray(scale))
        self.payload = Var(shape=(len(threshold),), init=np.ones(len(threshold), dtype=np.int64) if payload is None
                           else np.asarray(payload))
        self.threshold = Var(shape=(len(threshold),), init=np.asarray(threshold))
        self.reset = Var(shape=(len(reset),), init=np.asarray(reset))
        self.gain = Var(shape=(len(gain),), init=np.asarray(gain))


class _PhaseNeuronModel(PyLoihiProcessModel):
    def run_spk(self):
        step = self.time_step - 1
        received = self.a_in.recv()
        t_in = step - self.proc_params["input_start"]
        if 0 <= t_in < self.gain.shape[0]:
            self.integrate(received, self.gain[t_in])
        t = step - self.proc_params["fire_start"]
        if t == 0:
            self.start_firing()
        spikes = np.zeros(self.r.shape, dtype=np.int32)
        if 0 <= t < self.threshold.shape[0]:
            budget = self.proc_params["max_spikes"]
            spikes = self.fire(t, self.count < budget if budget else True)
            self.count += np.abs(spikes)  # a signed digit −1 is one spike
            spikes = spikes * self.payload[t]
        self.s_out.send(self.sign * spikes)

    def start_firing(self):
        if self.proc_params["signed_digits"]:  # the potential keeps its sign; each digit carries its own
            self.sign[:] = 1
            self.r[:] = self.u
            return
        self.sign[:] = np.sign(self.u)
        self.r[:] = np.abs(self.u)

    def digits(self, residual, threshold, allowed):
        """s_t: [r > θ'(t)] (0/1), or for a signed-digit site [r > θ'(t)] − [−r > θ'(t)]; masked by `allowed`."""
        spikes = (residual > threshold).astype(np.int32)
        if self.proc_params["signed_digits"]:
            spikes -= (-residual > threshold).astype(np.int32)
        return spikes * np.asarray(allowed, dtype=np.int32)


@implements(proc=PhaseNeuronProcess, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PhaseNeuronFloatModel(_PhaseNeuronModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    u: np.ndarray = LavaPyType(np.ndarray, float)
    r: np.ndarray = LavaPyType(np.ndarray, float)
    sign: np.ndarray = LavaPyType(np.ndarray, float)
    count: np.ndarray = LavaPyType(np.ndarray, int)
    saturated: np.ndarray = LavaPyType(np.ndarray, int)
    threshold: np.ndarray = LavaPyType(np.ndarray, float)
    reset: np.ndarray = LavaPyType(np.ndarray, float)
    gain: np.ndarray = LavaPyType(np.ndarray, float)
    acc: np.ndarray = LavaPyType(np.ndarray, float)
    scale: np.ndarray = LavaPyType(np.ndarray, float)
    payload: np.ndarray = LavaPyType(np.ndarray, int)

    def integrate(self, received, gain):
        self.u += gain * received

    def fire(self, t, allowed):
        residual = self.r.astype(np.float32)
        spikes = self.digits(residual, np.float32(self.threshold[t]), allowed)
        self.r[:] = residual - np.float32(self.reset[t]) * spikes.astype(np.float32)
        return spikes


@implements(proc=PhaseNeuronProcess, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PhaseNeuronFixedModel(_PhaseNeuronModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=2)
    u: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    r: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    sign: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=2)
    count: np.ndarray = LavaPyType(np.ndarray, np.int32)
    saturated: np.ndarray = LavaPyType(np.ndarray, np.int32)
    threshold: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    reset: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    gain: np.ndarray = LavaPyType(np.ndarray, float)
    acc: np.ndarray = LavaPyType(np.ndarray, float)
    scale: np.ndarray = LavaPyType(np.ndarray, float)
    payload: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)

    def integrate(self, received, gain):
        self.acc += received  # exact: integer synapse sums (< 2^53), or one op message

    def start_firing(self):
        limit = self.proc_params["limit"]
        total = np.rint(self.scale * self.acc)
        self.saturated += np.abs(total) > limit
        self.u[:] = np.clip(total, -limit, limit).astype(np.int64)
        super().start_firing()

    def fire(self, t, allowed):
        spikes = self.digits(self.r, self.threshold[t], allowed)
        self.r -= self.reset[t] * spikes
        return spikes


# ---- the non-spiking ops -------------------------------------------------------------------------------------------

def _rmsnorm(x, eps, weight=None):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * weight if weight is not None else y


def _softmax(x, causal):
    if causal:
        queries, keys = x.shape[-2:]
        future = np.arange(keys)[None, :] > np.arange(queries)[:, None] + (keys - queries)
        x = np.where(future, -np.inf, x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def _repeat_heads(b, groups):
    return np.repeat(b, groups, axis=-3) if groups > 1 else b


def _split_heads(x, heads, head_dim):
    return np.swapaxes(x.reshape(*x.shape[:-1], heads, head_dim), -3, -2)


def _merge_heads(x, heads, head_dim):
    x = np.swapaxes(x, -3, -2)
    return x.reshape(*x.shape[:-2], heads * head_dim)


def _kv_prefix(t, x, cache):
    cache = np.broadcast_to(cache if t == 0 else np.zeros_like(cache), (*x.shape[:-3], *cache.shape))
    return np.concatenate((cache, x), axis=-2)


def _rotation(x, before, left, right, after):
    """x·diag(before)·(left ⊗ right)·diag(after) on each block: leftᵀ·X·right on its (a, k) view X."""
    n = before.shape[0]
    blocks = (x.reshape(*x.shape[:-1], -1, n) * before).reshape(*x.shape[:-1], -1, left.shape[0], right.shape[0])
    return ((left.T @ (blocks @ right)).reshape(*x.shape[:-1], -1, n) * after).reshape(x.shape)


def _embedding(t, ids, weight):
    rows = weight[ids.astype(np.int64)]
    return rows if t == 0 else np.zeros_like(rows)


# name -> (rule, f(params) -> the function the rule applies)
OPS = {
    "rmsnorm": ("differential", lambda p: lambda x: _rmsnorm(x, p["eps"], p.get("weight"))),
    "softmax": ("differential", lambda p: lambda x: _softmax(x, p["causal"])),
    "silu": ("differential", lambda p: _silu),
    "product": ("bilinear", lambda p: np.multiply),
    "qk": ("bilinear", lambda p: lambda a, b: p["scaling"] * (a @ np.swapaxes(_repeat_heads(b, p["groups"]), -1, -2))),
    "pv": ("bilinear", lambda p: lambda a, b: p["scaling"] * (a @ _repeat_heads(b, p["groups"]))),
    "rope": ("per_step", lambda p: lambda t, x: x * p["cos"] + _rotate_half(x) * p["sin"]),
    "split_heads": ("per_step", lambda p: lambda t, x: _split_heads(x, p["heads"], p["head_dim"])),
    "merge_heads": ("per_step", lambda p: lambda t, x: _merge_heads(x, p["heads"], p["head_dim"])),
    "kv_prefix": ("per_step", lambda p: lambda t, x: _kv_prefix(t, x, p["cache"])),
    "rotation": ("per_step", lambda p: lambda t, x: _rotation(x, p["before"], p["left"], p["right"], p["after"])),
    "embedding": ("per_step", lambda p: lambda t, ids: _embedding(t, ids, p["weight"])),
    "add": ("per_step", lambda p: lambda t, a, b: a + b),
    "output": ("per_step", lambda p: lambda t, x: x),
}


class Op(AbstractProcess):
    """One non-spiking op. op: a key of OPS; ports: [{shape, start, steps, gain (list or None)}] in the op's
    argument order; shape: the output shape; start: the step of its event step 0; timesteps: T; params: the
    op's scalars and arrays."""

    def __init__(self, *, op: str, ports: list[dict], shape, start: int, timesteps: int, params: dict,
                 name: str | None = None):
        super().__init__(op=op, ports=ports, shape=tuple(shape), start=start, timesteps=timesteps, params=params,
                         name=name)
        for index, port in enumerate(ports):
            setattr(self, f"in{index}", InPort(shape=(int(np.prod(port["shape"])),)))
        self.y_out = OutPort(shape=(int(np.prod(shape)),))


class Op1(Op):
    """An Op with one input (in0)."""


class Op2(Op):
    """An Op with two inputs (in0, in1)."""


class _OpModel(PyLoihiProcessModel):
    y_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.rule, make = OPS[proc_params["op"]]
        if proc_params["params"].get("window"):
            self.rule = "window"
        self.function = make(proc_params["params"])
        self.ports = proc_params["ports"]
        self.values = [np.zeros((port["steps"], *port["shape"])) for port in self.ports]
        self.previous = 0.0

    def run_spk(self):
        step = self.time_step - 1
        for index, port in enumerate(self.ports):
            received = getattr(self, f"in{index}").recv()
            t_in = step - port["start"]
            if 0 <= t_in < port["steps"]:
                gain = 1.0 if port["gain"] is None else port["gain"][t_in]
                self.values[index][t_in] = gain * received.reshape(port["shape"])
        t = step - self.proc_params["start"]
        output = np.zeros(int(np.prod(self.proc_params["shape"])))
        if 0 <= t < self.proc_params["timesteps"]:
            output = getattr(self, self.rule)(t).reshape(-1)
        self.y_out.send(output)

    def window(self, t):
        """fixed_pt: once, on each port's window sum times its scale (hardware.loihi2's host-CPU op format)."""
        (rule, _) = OPS[self.proc_params["op"]]
        sums = [values.sum(axis=0) if port.get("scale") is None else values.sum(axis=0) * port["scale"]
                for values, port in zip(self.values, self.ports)]
        if rule == "per_step":
            return self.function(0, *sums)
        return self.function(*sums)

    def per_step(self, t):
        return self.function(t, *(values[t] for values in self.values))

    def differential(self, t):
        (values,) = self.values
        current = self.function(values[:t + 1].sum(axis=0))
        output, self.previous = current - self.previous, current
        return output

    def bilinear(self, t):
        (a, b) = (values[t] for values in self.values)
        (a_sum, b_sum) = (values[:t + 1].sum(axis=0) for values in self.values)
        return self.function(a_sum, b) + self.function(a, b_sum) - self.function(a, b)


@implements(proc=Op1, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt", "fixed_pt")
class Op1Model(_OpModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)


@implements(proc=Op2, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt", "fixed_pt")
class Op2Model(_OpModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in1: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)


MODELS = {"floating_pt": {PhaseNeuronProcess: PhaseNeuronFloatModel, Op1: Op1Model, Op2: Op2Model},
          "fixed_pt": {PhaseNeuronProcess: PhaseNeuronFixedModel, Op1: Op1Model, Op2: Op2Model}}
"""The ProcessModel of each Process class by tag (passed to the run config per instance, so Lava never has to
discover them by executing the files beside this one)."""
