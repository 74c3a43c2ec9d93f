"""Train, evaluate or predict with multimoe: ``python train.py fit --config configs/default.yaml``."""

from multimoe.training.cli import main

if __name__ == "__main__":
    main()
