"""`retrieval index`: bring a collection in step with folders. An unchanged folder is answered by the quick
pass (folder_state.py: the scan alone); otherwise the full pass (indexer.py) opens the table, deletes what is
gone, embeds what is new or changed, commits every few seconds and rebuilds the index.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from retrieval.config import EncoderConfig, IndexRunConfig
from retrieval.lifecycle import Interrupted
from retrieval.pipelines.folder_state import IndexSummary, check_roots, quick_pass

if TYPE_CHECKING:
    from retrieval.models.encoders import Encoder


def index_folder(
    paths: Sequence[str | os.PathLike],
    db: str | os.PathLike,
    encoder_cfg: EncoderConfig,
    run: IndexRunConfig = IndexRunConfig(),
    progress: bool = True,
    encoder: Encoder | None = None,
) -> IndexSummary:
    """One incremental pass. Interrupted (Ctrl-C, SIGTERM) after committing what was embedded."""
    start = time.perf_counter()
    roots = check_roots(paths)
    if not run.reembed and (quick := quick_pass(db, roots, encoder_cfg)) is not None:
        quick.seconds = time.perf_counter() - start
        return quick
    from retrieval.pipelines.indexer import (  # LanceDB: only past the quick pass
        FolderIndexer,
        open_collection,
    )

    collection, models = open_collection(db, encoder_cfg, run.reembed, encoder, run.index_settings())
    with collection:
        indexer = FolderIndexer(roots, collection, models, run, progress)
        try:
            return indexer.update()
        except KeyboardInterrupt:
            raise Interrupted(
                f"{indexer.committed} newly embedded image(s) committed, {collection.store.count()} in "
                f"{db}; run the same command to finish"
            ) from None
