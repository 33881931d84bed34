"""`python -m zidong ...`: the form `accelerate launch -m zidong` and `torchrun -m zidong` use."""

from zidong.cli import run

if __name__ == "__main__":
    run()
