"""Models that ship with the package: `savanna-v1`, the stand-in for last season's model
(the tiny TridentNet trained on a generated savanna survey; built by `tridentloop bench
--pretrain-source`, see backend/bench/source_model.py). Real users start from the
detectron2 model zoo or their previous survey's registry (`train.base_weights`)."""

from __future__ import annotations

from pathlib import Path

SAVANNA_V1 = Path(__file__).resolve().parent / "savanna-v1"
# the SHA-256 of savanna-v1/model_final.pth, as built and shipped
SAVANNA_V1_SHA256 = "cf35767346c2ff377aedc7d862d1755539705c35d439fcaf43cd357ea341bc56"
