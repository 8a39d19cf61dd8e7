"""Data files -> their header and first rows, as text: CSV (`.csv`, `.csv.gz`) and Parquet, read with one-line errors.

Takes a path; gives the checked header (`read_header`), the header and up to n rows as strings
(`read_sample`, for catalog.infer_schema), or a DataError naming the file and, where there is one, the
row: bytes that are not UTF-8, a damaged Parquet or gzip file, an unreadable file, a cell longer than
FIELD_LIMIT, a row with more fields than the header, a header that cannot be meant (duplicate or
space-padded names, another delimiter). The stdlib `csv` module reads CSV (no pandas, no torch: the
front end uses this); pyarrow is loaded only for a Parquet file. runtime/store.py checks every file's
header here before converting it.
"""

from __future__ import annotations

import csv
import gzip
import os
import stat
from pathlib import Path

__all__ = ["FIELD_LIMIT", "DataError", "is_data_file", "open_csv", "read_header", "read_sample", "unreadable"]

FIELD_LIMIT = 1 << 26  # the longest CSV cell the sample read takes (64 MiB; the csv module's default is 128 KiB)


class DataError(ValueError):
    """Bad data or schema; the message names the file, column and (1-based data) row."""


def is_data_file(path: Path) -> bool:
    """True for a regular file (through symlinks); a link to nothing or a link loop is a DataError, not an absent file."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{path}: a symbolic link to nothing ({os.readlink(path)})") from None
        return False
    except OSError as e:  # ELOOP (a symlink loop), EACCES on the folder, ...
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _cell(v: object) -> str:
    """A Parquet value as CSV would show it."""
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def open_csv(path: Path):  # type: ignore[no-untyped-def]
    """A CSV file (gzipped when it ends in .gz) as text; a UTF-8 byte-order mark is dropped."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def unreadable(path: Path, e: BaseException, line: int) -> DataError:
    """The one-line DataError of a read that failed at (1-based file) `line` of `path`."""
    if isinstance(e, UnicodeDecodeError):
        line = _first_non_utf8_line(path) or line  # the decoder reads ahead: find the line itself
    where = "the header" if line <= 1 else f"row {line - 1}"
    if isinstance(e, UnicodeDecodeError):
        return DataError(f"{path}: {where}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8")
    if isinstance(e, csv.Error):
        if "field larger" in str(e):
            return DataError(f"{path}: {where}: a cell longer than {FIELD_LIMIT} characters (an unclosed quote?)")
        return DataError(f"{path}: {where}: cannot parse: {e}")
    if isinstance(e, (EOFError, gzip.BadGzipFile)):
        return DataError(f"{path}: not a complete gzip file ({e})")
    if isinstance(e, OSError):
        return DataError(f"{path}: cannot read: {e.strerror or e}")
    return DataError(f"{path}: cannot read: {e}")


def _first_non_utf8_line(path: Path) -> int | None:
    """The 1-based line of the first bytes that are not UTF-8 (an error path: reads the file up to there)."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            for i, raw in enumerate(f):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return i + 1
    except (OSError, EOFError):
        return None
    return None


def _check_header(path: Path, header: list[str]) -> list[str]:
    """The header, or a DataError for one that cannot be meant (empty, repeated or space-padded names, another
    delimiter). Names are shown quoted exactly as in the file."""
    if not header or header == [""]:
        raise DataError(f"{path}: empty file")
    if len(header) == 1:
        for sep, name in ((";", "semicolon"), ("\t", "tab")):
            if sep in header[0]:
                raise DataError(f"{path}: the header is the single column {header[0][:60]!r}: the file looks "
                                f"{name}-delimited; mtldsl reads comma-separated files")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column(s) {', '.join(map(repr, dupes))} in the header")
    padded = [h for h in header if h != h.strip()]
    if padded:
        raise DataError(f"{path}: column {padded[0]!r} has spaces around its name (did you mean "
                        f"{padded[0].strip()!r}? write the header without spaces after the commas)")
    return header


def _parquet(path: Path):  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq  # lazy: only folders of Parquet without schema.json need it

    try:
        return pq.ParquetFile(path)
    except PermissionError as e:
        raise unreadable(path, e, 0) from None
    except Exception as e:  # pyarrow raises several types for a damaged, truncated or empty file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def read_header(path: Path) -> list[str]:
    """The column names of a data file (CSV, .csv.gz or Parquet), checked (_check_header); errors are DataErrors."""
    if path.suffix == ".parquet":
        return _check_header(path, list(_parquet(path).schema_arrow.names))
    return read_sample(path, 0)[0]


def read_sample(path: Path, n: int) -> tuple[list[str], list[list[str]]]:
    """Header and up to n rows of a data file, as strings; a row with more fields than the header is an error."""
    if path.suffix == ".parquet":
        pf = _parquet(path)
        header = _check_header(path, list(pf.schema_arrow.names))
        rows: list[list[str]] = []
        try:
            for batch in pf.iter_batches(batch_size=max(n, 1)):
                cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                rows.extend([_cell(v) for v in r] for r in zip(*cols))
                break
        except Exception as e:  # a truncated or corrupt row group
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        return header, rows[:n]
    line = 1
    limit = csv.field_size_limit(FIELD_LIMIT)
    try:
        with open_csv(path) as f:
            reader = csv.reader(f)
            header = _check_header(path, next(reader, []))
            rows = []
            while len(rows) < n:
                row = next(reader, None)
                line = reader.line_num + 1
                if row is None:
                    break
                if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
                    raise DataError(f"{path}: row {len(rows) + 1}: {len(row)} fields, the header has {len(header)} "
                                    "(an unquoted comma inside a value?)")
                rows.append(row)
    except DataError:
        raise
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as e:
        raise unreadable(path, e, line) from None
    finally:
        csv.field_size_limit(limit)
    return header, rows
