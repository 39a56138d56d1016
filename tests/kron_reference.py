"""A float64 NumPy transcription of Kron-PSGD (Li 2018, 2019, 2024; SPEC sections 2.2-2.3),
for the tests to compare the implementation with: one fitting step of a unit, and the whole
update at the defaults."""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

def apply(q, x, axis):
  """``q`` (dense (n, n) or diagonal (n,)) along ``axis`` of ``x``."""
  if q.ndim == 1:
    shape = [1] * x.ndim
    shape[axis] = q.shape[0]
    return x * q.reshape(shape)
  return np.moveaxis(np.tensordot(q, x, axes=(1, axis)), 0, axis)


def _gram(x, axis):
  moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  return moved @ moved.conj().T


def _norm_bound(a):
  """Two power iterations from the column of largest norm (the implementation's lower bound)."""
  scale = np.abs(a).max()
  if scale == 0:
    return 0.0
  a = a / scale
  x = a[:, np.argmax(np.sum(np.abs(a) ** 2, axis=0))]
  for _ in range(2):
    x = a @ (x / np.linalg.norm(x))
  return scale * np.linalg.norm(a @ (x / np.linalg.norm(x)))


def _norm_bound_gram(z):
  """``_norm_bound(z zᴴ)`` as the implementation runs it for thin ``z``."""
  scale = np.abs(z).max()
  z = z / scale
  x = z[:, np.argmax(np.sum(np.abs(z) ** 2, axis=0))]
  for _ in range(2):
    x = z @ (z.conj().T @ (x / np.linalg.norm(x)))
  x = x / np.linalg.norm(x)
  return scale**2 * np.linalg.norm(z @ (z.conj().T @ x))


def _rotation(q):
  """The online Procrustes rotation towards Hermitian: ``q + a R q + a²/2 R² q``."""
  r = q.conj().T - q
  r = r / np.linalg.norm(r) if np.linalg.norm(r) > 0 else r
  rq, rrq = r @ q, r @ r @ q
  t1, t2 = np.trace(rq).real, np.trace(rrq).real
  a = min(-t1 / t2, 0.25) if t2 < 0 else 0.25
  a = a if t1 > 0 else 0.0
  return q + a * (rq + 0.5 * a * rrq)


def fit_reference(geometry, factors, lips, inputs, lr, damping=1e-9, decay=0.9):
  """One Lie-group step of every factor of a unit, in float64, as SPEC 2.2 states it."""
  h, v, noise = (None if x is None else np.asarray(x, np.complex128 if np.iscomplexobj(x)
                                                    else np.float64) for x in inputs)
  rms = np.sqrt(np.mean(np.abs(h) ** 2))
  damped = h + (damping * (rms if rms > 0 else 1.0) + EPS32 * np.abs(h)) * noise
  factors = [np.asarray(q, np.complex128 if np.iscomplexobj(q) else np.float64) for q in factors]
  if geometry in ("procrustes", "quad"):  # A = P h̃, B = v (None: E[v vᴴ] = I integrated out)
    a, b = damped, v
    for axis, q in enumerate(factors):
      a = apply(q.conj().T @ q if q.ndim == 2 else q * q, a, axis)
  else:  # A = Q h̃, B = Q⁻ᴴ v, the damping noise as v for whitening
    a, b = damped, noise if v is None else v
    for axis, q in enumerate(factors):
      a = apply(q, a, axis)
      b = apply(np.linalg.inv(q).conj().T if q.ndim == 2 else 1 / q, b, axis)
  preconditioned = a  # P h̃ with P before the step (procrustes, quad)
  if not np.any(h != 0):  # no information: the unit is left alone
    return factors, list(lips), preconditioned
  new_factors, new_lips = [], []
  for axis, (q, lip) in enumerate(zip(factors, lips, strict=True)):
    n, numel = q.shape[0], a.size
    term1 = _gram(a, axis)
    term2 = numel / n * np.eye(n) if b is None else _gram(b, axis)
    low_rank = geometry in ("procrustes", "quad") and q.ndim == 2 and 2 * numel < n * n
    if q.ndim == 1:
      term1, term2 = np.diag(term1).real, np.diag(term2).real
      bound = np.max(term1 + term2)
    elif low_rank:
      unfold = lambda x: np.moveaxis(x, axis, 0).reshape(n, -1)  # noqa: B023, E731
      z = unfold(a) if b is None else np.concatenate([unfold(a), unfold(b)], axis=1)
      bound = _norm_bound_gram(z) + (numel / n if b is None else 0.0)
    elif b is None:
      bound = _norm_bound(term1) + numel / n
    else:
      bound = _norm_bound(term1 + term2)
    lip = max(decay * lip + (1 - decay) * bound, bound)
    step = lr * (np.sqrt(2 * numel) / n if low_rank else 1.0) / lip
    if q.ndim == 1:
      q = q * (1 - step * (term1 - term2))
    elif geometry == "procrustes":
      q = _rotation(q - step * (term1 - term2) @ q)
    elif geometry == "quad":  # (I - aE) Q (I - aE), a = step / 2, symmetrised
      e = term1 - term2
      p = q - step / 2 * e @ q
      p = p - step / 2 * p @ e
      q = (p + p.conj().T) / 2
    else:
      q = q - step * np.triu(term1 - term2) @ q
    new_factors.append(q)
    new_lips.append(lip)
  norms = [np.abs(q).max() for q in new_factors]
  gmean = np.exp(np.mean(np.log(norms)))
  return [q * gmean / m for q, m in zip(new_factors, norms, strict=True)], new_lips, preconditioned


def precondition(factors, x):
  """``P x`` with ``P = ⊗ Q_iᴴ Q_i`` (``q_i²`` for diagonal factors), in float64."""
  for axis, q in enumerate(factors):
    x = apply(q.conj().T @ q if q.ndim == 2 else q * q, x, axis)
  return x


class DefaultKron:
  """``scale_by_kron()`` with every default, for unbatched leaves without low-rank factors:
  momentum 0.9 (debiased), a refit every step (the first 200 steps of the default schedule),
  procrustes whitening on the momentum, the initial scale from the first step's momentum, the
  update ``P m̂`` with ``P`` before the step's fit, clipped to RMS 1.1. The damping (1e-9 of the
  target's RMS) lies below float32 round-off and is left out."""

  def __init__(self, dense_of):
    self.dense_of = dense_of  # leaf name -> per axis, dense or diagonal
    self.factors, self.lips, self.m, self.t = {}, {}, {}, 0

  def update(self, grads):
    self.t += 1
    out = {}
    for name, g in grads.items():
      g = np.asarray(g, np.float64)
      shape = g.shape if g.ndim else (1,)
      g = g.reshape(shape)
      if name not in self.factors:
        self.factors[name] = [np.eye(n) if d else np.ones(n)
                              for n, d in zip(shape, self.dense_of[name], strict=True)]
        self.lips[name] = [0.0] * len(shape)
        self.m[name] = np.zeros(shape)
      self.m[name] = 0.9 * self.m[name] + 0.1 * g
      m_hat = self.m[name] / (1 - 0.9**self.t)
      factors = self.factors[name]
      if self.t == 1:  # (mean h⁴)^(-1/8), split evenly over the factors
        scale = np.mean(m_hat**4) ** (-1 / 8) if np.any(m_hat != 0) else 1.0
        factors = [q * scale ** (1 / len(factors)) for q in factors]
      u = precondition(factors, m_hat)
      out[name] = (u / max(1.0, np.sqrt(np.mean(u**2)) / 1.1)).reshape(np.shape(grads[name]))
      self.factors[name], self.lips[name], _ = fit_reference(
          "procrustes", factors, self.lips[name], (m_hat, None, np.zeros(shape)), 0.1)
    return out
