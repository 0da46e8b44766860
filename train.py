"""Short DEQ demo until the Hydra application lands: a DEQ-MLP on scikit-learn's digits."""

import torch
from sklearn.datasets import load_digits
from torch import nn

from deq_lightning.deq import DEQ, apply_weight_norm


def main() -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x))
    train, test = perm[:1500], perm[1500:]
    inject, cell = nn.Linear(64, 128), apply_weight_norm(nn.Linear(128, 128))
    head, deq = nn.Linear(128, 10), DEQ(solver_opts={"max_iter": 20, "tol": 1e-4})
    params = [*inject.parameters(), *cell.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for epoch in range(10):
        for idx in train[torch.randperm(len(train))].split(64):
            u = inject(x[idx])
            z, stats = deq(lambda z, u=u: torch.tanh(0.5 * cell(z) + u), torch.zeros_like(u))
            loss = nn.functional.cross_entropy(head(z), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            u = inject(x[test])
            z, _ = deq(lambda z: torch.tanh(0.5 * cell(z) + u), torch.zeros_like(u))
            acc = (head(z).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f} fwd steps {stats.nstep.float().mean():.1f} "
              f"test acc {acc:.3f}")


if __name__ == "__main__":
    main()
