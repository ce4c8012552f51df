"""Class heads: a class matrix ``W: (C, D)`` (plus a bias for linear heads) and the ``HeadSpec`` that reads it."""

from edgekd.heads.class_head import ClassHead as ClassHead
from edgekd.heads.class_head import create_head as create_head
from edgekd.heads.class_head import default_margin as default_margin
from edgekd.heads.margin import HEAD_KINDS as HEAD_KINDS
from edgekd.heads.margin import HeadSpec as HeadSpec
