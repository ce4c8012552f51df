"""Multi-process training pieces over ``torch.distributed`` (SPEC §7): a class-sharded (Partial FC style) head.

``shards`` says which classes a rank owns (``torch.chunk`` sizes, DTensor's ``Shard(0)``); ``sharded_loss`` is the
shared-head loss over such shards, ``edgekd::sharded_shared_head``, with the chunked backend's sweep on each rank.
``head_shard`` holds a rank's rows of a head as trainable parameters (and clips gradients over shards), ``sync_bn``
normalizes a data-parallel backbone with the global batch's statistics, and ``launch`` joins the process group
torchrun made (or starts one: ``--nproc``). ``edgekd.train.sharded`` puts them together for ``fit``.
"""

from edgekd.distributed.sharded_loss import make_sharded_backend as make_sharded_backend
from edgekd.distributed.sharded_loss import sharded_shared_head_loss as sharded_shared_head_loss
from edgekd.distributed.shards import ClassShard as ClassShard
from edgekd.distributed.shards import class_shard as class_shard
from edgekd.distributed.shards import class_shard_of as class_shard_of
