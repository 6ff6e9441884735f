"""Train a small CNN on scikit-learn's digits, tracked with MLflow (in the style of MLflow's PyTorch tutorial).

train.py trains centrally: ``python examples/mlflow_script/train.py`` (MLflow's default tracking URI, or
``MLFLOW_TRACKING_URI``). train_federated.py is the same script as an fl_ray site, five lines apart:
``fl-ray run examples/mlflow_script/job.yaml``.
"""

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

config = {"epochs": 3, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "val_fraction": 0.2, "seed": 0}
mlflow.set_system_metrics_sampling_interval(1)


class Net(nn.Module):
    """Conv, pool, linear: enough for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def load_data() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0, y


def gpu_info() -> str:
    if not torch.cuda.is_available():
        return "no GPU: training on the CPU"
    return "\n".join(f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))


def main() -> None:
    torch.manual_seed(config["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = load_data()
    order = np.random.default_rng(config["seed"]).permutation(len(y))
    n_val = int(len(y) * config["val_fraction"])
    x_val, y_val = torch.tensor(x[order[:n_val]]), torch.tensor(y[order[:n_val]])
    x_train, y_train = torch.tensor(x[order[n_val:]]), torch.tensor(y[order[n_val:]])
    model = Net().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    loss_fn = nn.CrossEntropyLoss()

    with mlflow.start_run(log_system_metrics=True):
        mlflow.log_params(config)
        mlflow.log_text(gpu_info(), "gpu-info.txt")
        for epoch in range(config["epochs"]):
            model.train()
            train_loss = 0.0
            for batch in torch.randperm(len(y_train)).split(config["batch_size"]):
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[batch].to(device)), y_train[batch].to(device))
                loss.backward()
                optimizer.step()
                train_loss += loss.item() * len(batch)
            model.eval()
            with torch.no_grad():
                logits = model(x_val.to(device)).cpu()
            val_loss = loss_fn(logits, y_val).item()
            val_acc = (logits.argmax(1) == y_val).float().mean().item()
            mlflow.log_metrics(
                {"train_loss": train_loss / len(y_train), "val_loss": val_loss, "val_accuracy": val_acc}, step=epoch
            )
        mlflow.pytorch.log_model(model.cpu(), name="model", input_example=x_val[:4].numpy(), pip_requirements=["torch"])


if __name__ == "__main__":
    main()
