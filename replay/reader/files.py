"""File IO: format detection, whole reads and streamed frames of Parquet / CSV / CSV.gz."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from replay.mapping import IDENTITY, ColumnMapping
from replay.reader.base import _CSV_SUFFIXES, _PARQUET_SUFFIXES


def _format_of(path: Path, mp: ColumnMapping) -> str:
    if mp.format != "auto":
        return mp.format
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    with path.open("rb") as f:
        head = f.read(4)
    return "parquet" if head == b"PAR1" else "csv"


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"tick file not found: {path}")
    if not path.is_file():
        raise ValueError(f"tick file {path} is not a regular file")


def _read_error(path: Path, label: str, e: Exception) -> ValueError:
    return ValueError(
        f"cannot read {path} as {label} (corrupt or not a {label} file): {type(e).__name__}: {e}"
    )


def _read_frame(path: Path, mp: ColumnMapping = IDENTITY) -> pl.DataFrame:
    """Read a whole file into a frame (CSV: every column as text)."""
    _check_file(path)
    fmt = _format_of(path, mp)
    label = {"parquet": "Parquet", "csv": "CSV"}[fmt]
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        # All columns as text: unparsable values become per-row nulls below
        # (counted as malformed) instead of failing the whole file.
        frame = pl.read_csv(
            path, infer_schema=False, encoding="utf8-lossy", truncate_ragged_lines=True,
            has_header=mp.header, separator=mp.separator,
        )  # fmt: skip
        if not mp.header:
            frame.columns = [f"column_{i + 1}" for i in range(frame.width)]
        return frame
    except (FileNotFoundError, PermissionError):
        raise
    except pl.exceptions.NoDataError as e:
        raise ValueError(f"cannot read {path} as {label}: file is empty ({e})") from e
    except Exception as e:
        raise _read_error(path, label, e) from e


def _csv_header(path: Path, mp: ColumnMapping) -> list[str]:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            line = f.readline()
    except (OSError, EOFError) as e:
        raise _read_error(path, "CSV", e) from e
    if not line.strip():
        raise ValueError(f"cannot read {path} as CSV: file is empty")

    fields = next(csv.reader([line.rstrip("\r\n")], delimiter=mp.separator))
    if mp.header:
        return [c.strip() for c in fields]
    return [f"column_{i + 1}" for i in range(len(fields))]


class _BadRows:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, row) -> str:
        self.n += 1
        return "skip"


def _iter_frames(
    path: Path, mp: ColumnMapping, chunk_rows: int, columns: list[str] | None = None, bad=None
) -> Iterator[pl.DataFrame]:
    """Yield frames of at most ``chunk_rows`` rows (CSV: text columns), in bounded memory."""
    import pyarrow as pa  # deferred: pyarrow only on this file-format path

    _check_file(path)
    fmt = _format_of(path, mp)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

        try:
            # pre_buffer=False: with pre-buffering, iter_batches keeps every row group's
            # buffers until the end (memory grows with the file); without, it stays flat
            pf = pq.ParquetFile(path, pre_buffer=False)
        except Exception as e:
            raise _read_error(path, "Parquet", e) from e
        cols = None
        if columns is not None:
            have = set(pf.schema_arrow.names)
            cols = [c for c in columns if c in have]
        try:
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
                yield pl.from_arrow(pa.Table.from_batches([batch]))  # type: ignore[misc]
        except Exception as e:
            raise _read_error(path, "Parquet", e) from e
        return
    import pyarrow.csv as pcsv  # deferred: pyarrow only on this file-format path

    names = _csv_header(path, mp)
    stream = pa.input_stream(str(path), compression="gzip" if _is_gzip(path) else None)
    include = names if columns is None else [c for c in names if c in set(columns)]
    read_opts = pcsv.ReadOptions(column_names=names, skip_rows=1 if mp.header else 0,
                                 block_size=8 << 20, use_threads=True)  # fmt: skip
    parse_opts = pcsv.ParseOptions(delimiter=mp.separator, invalid_row_handler=bad or _BadRows())
    conv_opts = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in names}, include_columns=include,
        strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True,
    )  # fmt: skip
    try:
        reader = pcsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts,
                               convert_options=conv_opts)  # fmt: skip
    except pa.ArrowInvalid as e:
        if "Empty CSV" in str(e):
            return
        raise _read_error(path, "CSV", e) from e
    except Exception as e:
        raise _read_error(path, "CSV", e) from e
    pending: list[pl.DataFrame] = []
    held = 0
    try:
        for batch in reader:
            df = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(df, pl.DataFrame)
            pending.append(df)
            held += df.height
            while held >= chunk_rows:
                big = pl.concat(pending) if len(pending) > 1 else pending[0]
                yield big.head(chunk_rows)
                rest = big.slice(chunk_rows)
                pending = [rest] if rest.height else []
                held = rest.height
    except Exception as e:
        if isinstance(e, GeneratorExit):
            raise
        raise _read_error(path, "CSV", e) from e
    if held:
        yield pl.concat(pending) if len(pending) > 1 else pending[0]


# =========================================================================== column plan
