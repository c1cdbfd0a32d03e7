"""RQ-VAE: MLP encoder -> residual quantization (L levels x K codes) -> MLP decoder.

Quantization uses the fused op :func:`genrec_fast.ops.rq.residual_quantize`: its x_hat is
straight-through for the encoder and sends the decoder's gradient to the chosen codewords.
Per level l (residual r_l, chosen codeword q_l, r_{l+1} = r_l - sg(q_l)) the loss adds the
codebook term ||sg(r_l) - q_l||^2 and the commitment term beta * ||r_l - sg(q_l)||^2
(beta = 0.25). Codebooks start from residual k-means on the initial latents; codes unused
in an epoch are reset to random latent residuals of their level. The trainer keeps the
checkpoint with the fewest SID collisions (ties: the later one).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from genrec_fast.ops.rq import residual_quantize
from genrec_fast.sid.kmeans import ResidualKMeans


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(
        self,
        in_dim: int,
        latent_dim: int = 32,
        hidden: Sequence[int] = (512, 256, 128),
        levels: int = 3,
        codebook_size: int = 256,
        beta: float = 0.25,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.levels, self.codebook_size, self.beta, self.backend = levels, codebook_size, beta, backend
        self.encoder = _mlp([in_dim, *hidden, latent_dim], dropout)
        self.decoder = _mlp([latent_dim, *reversed(hidden), in_dim], dropout)
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent_dim) * 0.01)

    def quantize(self, z: torch.Tensor):
        """-> (codes [N, L] int32, z_q [N, d], per-level input residuals [L, N, d], rq loss)."""
        codes, z_q = residual_quantize(z, self.codebooks, backend=self.backend)
        idx = codes.long()
        r = z
        residuals, loss = [], z.new_zeros(())
        for lvl in range(self.levels):
            q = self.codebooks[lvl].index_select(0, idx[:, lvl])
            residuals.append(r)
            loss = loss + F.mse_loss(q, r.detach()) + self.beta * F.mse_loss(r, q.detach())
            r = r - q.detach()
        return codes, z_q, torch.stack(residuals), loss

    def forward(self, x: torch.Tensor):
        """-> (reconstruction, codes, recon loss, rq loss)."""
        z = self.encoder(x)
        codes, z_q, _, rq_loss = self.quantize(z)
        x_rec = self.decoder(z_q)
        return x_rec, codes, F.mse_loss(x_rec, x), rq_loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (codes [N, L] int32, last-level input residuals [N, d]) in eval mode."""
        was_training = self.training
        self.eval()
        codes, last = [], []
        for s in range(0, x.shape[0], batch_size):
            c, _, res, _ = self.quantize(self.encoder(x[s:s + batch_size]))
            codes.append(c)
            last.append(res[-1])
        self.train(was_training)
        return torch.cat(codes), torch.cat(last)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0, iters: int = 10) -> None:
        """Residual k-means on the current latents of ``x``."""
        was_training = self.training
        self.eval()
        z = self.encoder(x)
        rkm = ResidualKMeans(self.levels, self.codebook_size, iters=iters, seed=seed, backend=self.backend)
        rkm.fit(z)
        self.codebooks.copy_(rkm.codebooks)
        self.train(was_training)

    @torch.no_grad()
    def reset_dead_codes(self, usage: torch.Tensor, residuals: torch.Tensor, generator: torch.Generator) -> int:
        """Codes with zero ``usage`` [L, K] get random rows of ``residuals`` [L, N, d]. Returns how many."""
        dead = usage == 0
        n = residuals.shape[1]
        for lvl in range(self.levels):
            idx = torch.nonzero(dead[lvl]).flatten()
            if idx.numel():
                pick = torch.randint(n, (idx.numel(),), generator=generator).to(residuals.device)
                self.codebooks[lvl, idx] = residuals[lvl, pick]
        return int(dead.sum())


def _num_collisions(codes: torch.Tensor) -> int:
    return int(codes.shape[0] - torch.unique(codes, dim=0).shape[0])


def train_rqvae(
    x: torch.Tensor,
    levels: int = 3,
    codebook_size: int = 256,
    latent_dim: int = 32,
    hidden: Sequence[int] = (512, 256, 128),
    epochs: int = 150,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    beta: float = 0.25,
    eval_every: int = 10,
    seed: int = 0,
    device: Optional[str] = None,
    backend: str = "auto",
    progress: bool = True,
) -> Tuple[RQVAE, dict]:
    """Train an RQ-VAE on item embeddings ``x`` [N, H]; returns (best model, training report)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"train_rqvae: x must be a non-empty [N, H] tensor, got shape {tuple(x.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = x.float().to(device)
    n = x.shape[0]
    model = RQVAE(x.shape[1], latent_dim, hidden, levels, codebook_size, beta, backend=backend).to(device)
    model.init_codebooks(x, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_state, best_coll, best_epoch = None, None, -1
    history = []
    bar = tqdm(range(1, epochs + 1), desc="rq-vae", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        usage = torch.zeros(levels, codebook_size, dtype=torch.long, device=device)
        tot_rec = tot_rq = 0.0
        for s in range(0, n, batch_size):
            xb = x[perm[s:s + batch_size]]
            _, codes, rec, rq = model(xb)
            loss = rec + rq
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_rec += float(rec.detach()) * xb.shape[0]
            tot_rq += float(rq.detach()) * xb.shape[0]
            for lvl in range(levels):
                usage[lvl] += torch.bincount(codes[:, lvl].long(), minlength=codebook_size)
        if epoch == epochs or epoch % eval_every == 0:
            codes, _ = model.encode(x)
            coll = _num_collisions(codes)
            history.append({"epoch": epoch, "recon": tot_rec / n, "rq": tot_rq / n, "collisions": coll})
            if best_coll is None or coll <= best_coll:
                best_state, best_coll, best_epoch = copy.deepcopy(model.state_dict()), coll, epoch
            bar.set_postfix(recon=f"{tot_rec / n:.4f}", coll=coll)
        if epoch < epochs and (usage == 0).any():
            with torch.no_grad():
                model.eval()
                _, _, residuals, _ = model.quantize(model.encoder(x))
            model.reset_dead_codes(usage, residuals, gen)
    model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, "best_collisions": best_coll, "history": history}
