from multimoe.heads.captioning import CaptionDecoder
from multimoe.heads.classification import ClassificationHead

__all__ = ["CaptionDecoder", "ClassificationHead"]
