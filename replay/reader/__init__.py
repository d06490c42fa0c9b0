"""Read market files (Parquet, CSV, CSV.gz) into tick arrays, whole or in bounded chunks.

:func:`read_ticks` loads a whole file; :func:`iter_tick_chunks` streams a file
larger than memory in chunks of at most ``chunk_rows`` rows (pyarrow streaming
readers: Parquet row groups / batches, CSV and gzip CSV blocks), so memory
stays bounded by the chunk size whatever the file size.  Both normalise rows
into numpy arrays of :data:`engine.schema.TICK_DTYPE` without a per-row Python
loop, with the same code, so reading in chunks gives exactly the ticks of one
whole read.  Bad rows never raise: they are counted by reject reason.

A file in another vendor's layout is read through a column mapping
(:mod:`replay.mapping`: column names, timestamp units, price encodings, event
and side codes); without one the file must be in the normalised schema below.

Event shapes (``shape``)
------------------------

* ``l1`` (default): quotes and trades.  The reader applies the single
  acceptance rule of :func:`features.validate.validate_tick` (in file order,
  carried across chunks): the ticks it returns are exactly the ones the L1 live
  loop would accept, every other row is counted by reason.
* ``trades``: trade-only feeds (time, price, size, optional aggressor side); a
  missing ``kind`` means every row is a trade.
* ``l3``: order-by-order events (add / modify / delete / trade-or-fill by order
  id, clear).  Whether an event is acceptable depends on the book (an unknown
  order id, a price far from the mid), so for ``trades`` and ``l3`` the reader
  only rejects what cannot become a tick at all (``malformed``, a non-finite
  timestamp) and the feature kernel counts the rest when it applies the event.

The normalised file schema (columns, types) and the reject reasons are in the
README ("Input tick schema", "Event shapes"); the per-field rules of a row are
in :mod:`replay.reader.normalise`.  Rows the reader keeps but counts as
anomalies: ``skipped`` (kind mapped to ``skip``), ``recv_backwards``,
``reordered`` / ``late`` (``sort_by_exchange_time``), ``same_ts``.

Sorting by exchange time is a stable sort on ``ts_event_ns``.  A whole read
sorts exactly; a chunked read holds rows back until the next chunk shows no
earlier time, so it is exact as long as no row is displaced by more than one
chunk, and memory stays bounded (about three chunks).

The package, one concern per module: :mod:`~replay.reader.base` (columns,
result types), :mod:`~replay.reader.files` (formats, whole and streamed
frames), :mod:`~replay.reader.plan` (which column feeds which field),
:mod:`~replay.reader.normalise` (frames -> ticks, row checks),
:mod:`~replay.reader.read` (whole reads, shape detection, reject
explanations), :mod:`~replay.reader.chunks` (bounded-memory chunks).
"""

from replay.reader.base import (
    DEFAULT_CHUNK_ROWS,
    OPTIONAL_COLUMNS,
    QUOTE_COLUMNS,
    REQUIRED_COLUMNS,
    SHAPES,
    TRADE_COLUMNS,
    TickChunk,
    TickData,
)
from replay.reader.chunks import TickChunks, iter_tick_chunks
from replay.reader.read import detect_shape, explain_rejects, read_ticks, resolve_shape

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "REQUIRED_COLUMNS",
    "QUOTE_COLUMNS",
    "TRADE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SHAPES",
    "TickData",
    "TickChunk",
    "TickChunks",
    "read_ticks",
    "iter_tick_chunks",
    "detect_shape",
    "resolve_shape",
    "explain_rejects",
]
