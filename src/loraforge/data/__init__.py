"""Training and evaluation data: ``records`` reads rows into ``Example``s, ``encode`` turns them
into token ids, loss masks and packed batches. Everything is re-exported here (``from loraforge
import data as D``)."""
from loraforge.data.encode import *  # noqa: F401,F403
from loraforge.data.encode import __all__ as _encode_all
from loraforge.data.records import *  # noqa: F401,F403
from loraforge.data.records import __all__ as _records_all

__all__ = _records_all + _encode_all
