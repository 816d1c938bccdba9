"""The tags editor (mode `tags`): one image of the scanned dataset, large-ish, with its caption to edit, its
tags as removable chips and an input that adds a tag (completion from the dataset's tag frequencies);
bulk add/remove/replace over marked images (or all), with undo.

Saving writes the caption with the stamp read when the image was opened (`captions.write_caption`): if
the file changed on disk since, nothing is written — the screen says so and shows the file's text again.
An edit not yet saved is kept as a draft (●) when moving to another image. Bulk edits go through
`datasets.tags.edit_captions` (conflict-safe, journaled) and `u` undoes the last batch (`datasets.undo`).
File writes and reads of many captions run in thread workers that post messages back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.suggester import SuggestFromList
from textual.widgets import DataTable, Footer, Input, Label, Static, TextArea

from nyx_tui.datasets.captions import MISSING, CaptionStamp
from nyx_tui.datasets.tags import join_tags, split_tags
from nyx_tui.screens.datasets import DatasetSession, session_of
from nyx_tui.widgets.tag_chips import TagChips
from nyx_tui.widgets.thumbs import Thumb

if TYPE_CHECKING:
    from nyx_tui.datasets.scan import Dataset, ImageEntry
    from nyx_tui.datasets.tags import BatchResult
    from nyx_tui.datasets.undo import UndoResult

PREVIEW_PX = 320
Captions = list[tuple[str, str | None, CaptionStamp]]  # (rel, caption or None for no file, stamp)


def read_captions(entries: Sequence[ImageEntry]) -> Captions:
    """The captions of `entries` as they are on disk now (blocking: call from a thread)."""
    from nyx_tui.datasets.captions import read_caption

    out: Captions = []
    for e in entries:
        try:
            text, stamp = read_caption(e.caption_path)
        except OSError:
            continue
        out.append((e.rel, None if stamp == MISSING else text, stamp))
    return out


def tag_suggestions(ds: Dataset | None) -> list[str]:
    """Every tag of the dataset, most frequent first (what the add-tag input completes from)."""
    from nyx_tui.datasets.tags import tag_frequencies

    if ds is None:
        return []
    freq = tag_frequencies(ds.images)
    return [t for t, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]


def result_summary(result: BatchResult) -> str:
    text = f"{len(result.written)} written"
    if not result.edits:
        text = "nothing to change"
    if result.conflicts:
        names = ", ".join(p.name for p in result.conflicts[:4])
        text += f"; {len(result.conflicts)} changed on disk since they were read, not overwritten ({names})"
    if result.errors:
        text += f"; {len(result.errors)} could not be written ({result.errors[0][1]})"
    return text


class BulkPrompt(ModalScreen[list[str] | None]):
    """Asks for the tag(s) of a bulk operation: one field, or two for replace."""

    DEFAULT_CSS = """
    BulkPrompt { align: center middle; }
    BulkPrompt > Vertical { width: 70; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    BulkPrompt .title { text-style: bold; margin-bottom: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="nyx.tags.prompt_cancel"),
    ]

    def __init__(self, title: str, fields: Sequence[str], suggestions: Sequence[str]) -> None:
        super().__init__()
        self.title_text, self.fields, self.suggestions = title, list(fields), list(suggestions)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(content=self.title_text, classes="title")
            for i, name in enumerate(self.fields):
                yield Label(name)
                yield Input(
                    id=f"field-{i}",
                    suggester=SuggestFromList(self.suggestions, case_sensitive=False),
                    placeholder="tag (→ completes)",
                )

    def on_mount(self) -> None:
        self.query_one("#field-0", Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        values = [self.query_one(f"#field-{i}", Input).value.strip() for i in range(len(self.fields))]
        missing = next((i for i, v in enumerate(values) if not v), None)
        if missing is not None:
            self.query_one(f"#field-{missing}", Input).focus()
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TagsScreen(Screen[None]):
    """Caption editor for the dataset scanned on the datasets screen."""

    DEFAULT_CSS = """
    TagsScreen #tags-title { height: 1; padding: 0 1; background: $panel; color: $text; text-style: bold; }
    TagsScreen #tags-main { height: 1fr; }
    TagsScreen #tag-list { width: 44; height: 1fr; }
    TagsScreen #tags-editor { width: 1fr; padding: 0 1; }
    TagsScreen #tag-image > .thumb-image { height: 16; }
    TagsScreen #caption { height: 6; }
    TagsScreen #chips { margin: 1 0; }
    TagsScreen #add-tag { width: 1fr; }
    TagsScreen #tags-empty { height: 1fr; content-align: center middle; text-align: center; color: $text-muted; }
    TagsScreen #tags-empty { display: none; }
    TagsScreen.-empty #tags-empty { display: block; }
    TagsScreen.-empty #tags-main { display: none; }
    TagsScreen .hint { color: $text-muted; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", id="nyx.tags.save", priority=True),
        Binding("ctrl+r", "reload", "Reload", id="nyx.tags.reload"),
        Binding("ctrl+up", "move(-1)", "Prev", id="nyx.tags.prev", priority=True),
        Binding("ctrl+down", "move(1)", "Next", id="nyx.tags.next", priority=True),
        Binding("space", "mark", "Mark", id="nyx.tags.mark"),
        Binding("a", "mark_all", "Mark all", id="nyx.tags.mark_all"),
        Binding("plus", "bulk('add')", "Add to marked", id="nyx.tags.bulk_add"),
        Binding("minus", "bulk('remove')", "Remove", id="nyx.tags.bulk_remove"),
        Binding("asterisk", "bulk('replace')", "Replace", id="nyx.tags.bulk_replace"),
        Binding("u", "undo", "Undo batch", id="nyx.tags.undo"),
        Binding("t", "focus_add", "Add tag", id="nyx.tags.add", show=False),
        Binding("escape", "back", "Datasets", id="nyx.tags.back", show=False),
    ]

    class Saved(Message):
        def __init__(self, rel: str, text: str, stamp: CaptionStamp) -> None:
            super().__init__()
            self.rel, self.text, self.stamp = rel, text, stamp

    class Conflict(Message):
        def __init__(self, rel: str, mine: str, disk: str, stamp: CaptionStamp) -> None:
            super().__init__()
            self.rel, self.mine, self.disk, self.stamp = rel, mine, disk, stamp

    class SaveFailed(Message):
        def __init__(self, rel: str, error: str) -> None:
            super().__init__()
            self.rel, self.error = rel, error

    class BatchDone(Message):
        def __init__(self, title: str, summary: str, ok: bool, captions: Captions) -> None:
            super().__init__()
            self.title, self.summary, self.ok, self.captions = title, summary, ok, captions

    def __init__(self, *, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.rels: list[str] = []
        self.marked: set[str] = set()
        # unsaved edits: rel → (text, stamp when read, text when read)
        self.drafts: dict[str, tuple[str, CaptionStamp, str]] = {}
        self.open_rel: str | None = None
        self.loaded_text = ""  # the caption as read from disk when the image was opened
        self.stamp: CaptionStamp = MISSING  # its stamp: what a save expects to find on disk
        self._seen_version = -1
        self._busy = False

    @property
    def session(self) -> DatasetSession:
        return session_of(self.app)

    def compose(self) -> ComposeResult:
        yield Static(content="Tags", id="tags-title")
        yield Static(
            content="No dataset yet.\n\nOpen the Datasets screen (4), scan a folder, pick an image and press e.",
            id="tags-empty",
        )
        with Horizontal(id="tags-main"):
            table: DataTable[Any] = DataTable(id="tag-list", cursor_type="row", zebra_stripes=True)
            table.add_column(" ", key="mark")
            table.add_column("image", key="image")
            table.add_column("tags", key="tags")
            yield table
            with Vertical(id="tags-editor"):
                yield Thumb(PREVIEW_PX, id="tag-image")
                yield Label("Caption (ctrl+s saves)")
                yield TextArea(id="caption", soft_wrap=True, show_line_numbers=False)
                yield TagChips(id="chips")
                yield Input(id="add-tag", placeholder="add a tag: type, → completes, enter adds")
                yield Static(
                    content="space marks · a marks all · + − * add/remove/replace on marked (or all) · u undoes",
                    classes="hint",
                )
        yield Footer()

    def on_mount(self) -> None:
        self._sync()

    def on_screen_resume(self) -> None:
        self._sync()

    # ------------------------------------------------------------------ the dataset
    def _sync(self) -> None:
        """Catch up with the session: a new scan rebuilds the list; a new current image is opened."""
        session = self.session
        ds = session.dataset
        self.set_class(ds is None or not ds.images, "-empty")
        if ds is None:
            return
        if session.version != self._seen_version:
            self._seen_version = session.version
            known = set(ds.by_rel())
            self.marked &= known
            self.drafts = {k: v for k, v in self.drafts.items() if k in known}
            self.rels = [e.rel for e in ds.images]
            self.query_one("#add-tag", Input).suggester = SuggestFromList(tag_suggestions(ds), case_sensitive=False)
            self._fill_list()
        current = session.current if session.current in self.rels else (self.rels[0] if self.rels else None)
        if current is not None and current != self.open_rel:
            self._move_cursor(current)
            self.open_image(current)
        elif current is not None and self.open_rel == current and current not in self.drafts:
            self._reload_if_clean()
        self._update_title()

    def _fill_list(self) -> None:
        table = self.query_one("#tag-list", DataTable)
        table.clear()
        for rel in self.rels:
            table.add_row(*self._cells(rel), key=rel)
        if self.open_rel in self.rels:
            self._move_cursor(self.open_rel)

    def _cells(self, rel: str) -> tuple[Text, str, str]:
        entry = self.session.entry(rel)
        mark = Text("■" if rel in self.marked else " ", style="bold")
        if rel in self.drafts or (rel == self.open_rel and self.dirty):
            mark.append("●", style="yellow")
        else:
            mark.append(" ")
        tags = "—" if entry is None or entry.caption is None else str(len(entry.tags))
        return mark, rel, tags

    def _update_row(self, rel: str) -> None:
        table = self.query_one("#tag-list", DataTable)
        if rel not in self.rels:
            return
        mark, _, tags = self._cells(rel)
        table.update_cell(rel, "mark", mark)
        table.update_cell(rel, "tags", tags)

    def _move_cursor(self, rel: str | None) -> None:
        if rel in self.rels:
            table = self.query_one("#tag-list", DataTable)
            index = self.rels.index(rel)
            if table.cursor_row != index:
                table.move_cursor(row=index, animate=False)

    def _update_title(self) -> None:
        ds = self.session.dataset
        if ds is None or self.open_rel is None:
            self.query_one("#tags-title", Static).update("Tags")
            return
        index = self.rels.index(self.open_rel) + 1 if self.open_rel in self.rels else 0
        marked = f" · {len(self.marked)} marked" if self.marked else ""
        drafts = len(self.drafts) + (1 if self.dirty and self.open_rel not in self.drafts else 0)
        unsaved = f" · {drafts} unsaved" if drafts else ""
        self.query_one("#tags-title", Static).update(
            f"Tags · {ds.root.name}/{self.open_rel} ({index}/{len(self.rels)}){marked}{unsaved}"
        )

    # ------------------------------------------------------------------ one image
    @property
    def caption_area(self) -> TextArea:
        return self.query_one("#caption", TextArea)

    @property
    def dirty(self) -> bool:
        if self.open_rel is None or not self.is_mounted:
            return False
        return self.caption_area.text.strip() != self.loaded_text

    def open_image(self, rel: str) -> None:
        """Show `rel`: its draft if it has one, else its caption read from disk now (text and stamp)."""
        from nyx_tui.datasets.captions import read_caption

        entry = self.session.entry(rel)
        if entry is None:
            return
        self._stash_draft()
        self.open_rel = rel
        self.session.current = rel
        if rel in self.drafts:
            text, self.stamp, self.loaded_text = self.drafts.pop(rel)
        else:
            try:
                self.loaded_text, self.stamp = read_caption(entry.caption_path)
            except OSError as e:
                self.notify(f"cannot read {entry.caption_path.name}: {e}", severity="error")
                self.loaded_text, self.stamp = "", entry.stamp
            text = self.loaded_text
        self.caption_area.load_text(text)
        self.query_one("#chips", TagChips).set_tags(split_tags(text))
        self.query_one("#tag-image", Thumb).show(entry.path if entry.readable else None)
        self._update_row(rel)
        self._update_title()

    def _stash_draft(self) -> None:
        if self.open_rel is None or not self.dirty:
            return
        self.drafts[self.open_rel] = (self.caption_area.text, self.stamp, self.loaded_text)
        self.notify(f"{Path(self.open_rel).name}: edit kept as a draft (●), not saved yet", timeout=3)
        self._update_row(self.open_rel)

    def _reload_if_clean(self) -> None:
        if self.open_rel is not None and not self.dirty:
            rel, self.open_rel = self.open_rel, None
            self.open_image(rel)

    @on(DataTable.RowHighlighted, "#tag-list")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        rel = str(event.row_key.value)
        if rel != self.open_rel:
            self.open_image(rel)

    @on(DataTable.RowSelected, "#tag-list")
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.caption_area.focus()

    @on(TextArea.Changed, "#caption")
    def _caption_changed(self, event: TextArea.Changed) -> None:
        self.query_one("#chips", TagChips).set_tags(split_tags(event.text_area.text))
        if self.open_rel is not None:
            self._update_row(self.open_rel)
            self._update_title()

    @on(TagChips.Removed)
    def _chip_removed(self, event: TagChips.Removed) -> None:
        tags = [t for t in split_tags(self.caption_area.text) if t != event.tag]
        self._set_caption(join_tags(tags))

    @on(Input.Submitted, "#add-tag")
    def _add_tag(self, event: Input.Submitted) -> None:
        event.stop()
        from nyx_tui.datasets.tags import add_tags

        new = split_tags(event.value)
        if not new or self.open_rel is None:
            return
        self._set_caption(join_tags(add_tags(new)(split_tags(self.caption_area.text))))
        event.input.value = ""

    def _set_caption(self, text: str) -> None:
        area = self.caption_area
        area.replace(text, area.document.start, area.document.end)

    # ------------------------------------------------------------------ actions: one image
    def action_move(self, delta: int) -> None:
        if not self.rels:
            return
        index = self.rels.index(self.open_rel) if self.open_rel in self.rels else 0
        index = min(max(index + delta, 0), len(self.rels) - 1)
        self._move_cursor(self.rels[index])
        if self.rels[index] != self.open_rel:
            self.open_image(self.rels[index])

    def action_focus_add(self) -> None:
        self.query_one("#add-tag", Input).focus()

    def action_back(self) -> None:
        if "datasets" in getattr(self.app, "MODES", {}):
            self.app.switch_mode("datasets")
        elif len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    def action_reload(self) -> None:
        """Forget the edit of this image and show the caption as it is on disk."""
        if self.open_rel is None:
            return
        rel, self.open_rel = self.open_rel, None
        self.drafts.pop(rel, None)
        self.open_image(rel)
        self.notify(f"reloaded {Path(rel).name} from disk", timeout=3)

    def action_save(self) -> None:
        entry = self.session.entry(self.open_rel)
        if entry is None:
            return
        self._save(entry.rel, entry.caption_path, self.caption_area.text, self.stamp)

    @work(thread=True, group="tags-save", exit_on_error=False)
    def _save(self, rel: str, path: Path, text: str, stamp: CaptionStamp) -> None:
        from nyx_tui.datasets.captions import CaptionConflict, read_caption, write_caption

        try:
            new = write_caption(path, text, stamp)
        except CaptionConflict:
            disk, disk_stamp = read_caption(path)
            self.post_message(self.Conflict(rel, text, disk, disk_stamp))
        except OSError as e:
            self.post_message(self.SaveFailed(rel, e.strerror or str(e)))
        else:
            self.post_message(self.Saved(rel, text.strip(), new))

    def on_tags_screen_saved(self, message: Saved) -> None:
        entry = self.session.entry(message.rel)
        if entry is not None:
            entry.caption, entry.stamp = message.text, message.stamp
        if message.rel == self.open_rel:
            self.loaded_text, self.stamp = message.text, message.stamp
        self._changed_captions([message.rel])
        self.notify(f"saved {Path(message.rel).name}", title="caption", timeout=3)

    def on_tags_screen_conflict(self, message: Conflict) -> None:
        entry = self.session.entry(message.rel)
        if entry is not None:
            entry.caption = message.disk if message.stamp != MISSING else None
            entry.stamp = message.stamp
        self.drafts.pop(message.rel, None)
        if message.rel == self.open_rel:
            self.loaded_text, self.stamp = message.disk, message.stamp
            self.caption_area.load_text(message.disk)
        self._changed_captions([message.rel])
        self.notify(
            f"{Path(message.rel).name} was changed on disk after you opened it, so it was NOT saved.\n"
            f"Showing the file's text now. Your edit was:\n{message.mine}",
            title="caption conflict: not overwritten",
            severity="error",
            timeout=20,
        )

    def on_tags_screen_save_failed(self, message: SaveFailed) -> None:
        self.notify(f"{message.rel}: {message.error}", title="not saved", severity="error", timeout=12)

    def _changed_captions(self, rels: Sequence[str]) -> None:
        """Captions of `rels` changed: tell the datasets screen, redraw those rows and the completions."""
        session = self.session
        session.version += 1
        self._seen_version = session.version
        self.query_one("#add-tag", Input).suggester = SuggestFromList(
            tag_suggestions(session.dataset), case_sensitive=False
        )
        for rel in rels:
            self._update_row(rel)
        self._update_title()

    # ------------------------------------------------------------------ actions: many images
    def action_mark(self) -> None:
        if self.open_rel is None:
            return
        self.marked ^= {self.open_rel}
        self._update_row(self.open_rel)
        self._update_title()
        self.action_move(1)

    def action_mark_all(self) -> None:
        before = set(self.marked)
        self.marked = set() if len(self.marked) == len(self.rels) else set(self.rels)
        for rel in before ^ self.marked:
            self._update_row(rel)
        self._update_title()

    def target(self) -> list[ImageEntry]:
        ds = self.session.dataset
        if ds is None:
            return []
        return [e for e in ds.images if e.rel in self.marked] if self.marked else list(ds.images)

    def action_bulk(self, what: str) -> None:
        ds = self.session.dataset
        if ds is None or self._busy:
            return
        entries = self.target()
        scope = f"{len(entries)} marked images" if self.marked else f"ALL {len(entries)} images (none marked)"
        titles = {"add": "Add tag(s) to", "remove": "Remove tag(s) from", "replace": "Replace a tag in"}
        fields = ["replace", "with"] if what == "replace" else ["tag(s), comma-separated"]

        def answered(values: list[str] | None) -> None:
            if values:
                self._busy = True
                self._bulk(ds, what, values, entries)

        self.app.push_screen(BulkPrompt(f"{titles[what]} {scope}", fields, tag_suggestions(ds)), answered)

    @work(thread=True, group="tags-bulk", exit_on_error=False)
    def _bulk(self, ds: Dataset, what: str, values: list[str], entries: list[ImageEntry]) -> None:
        from nyx_tui.datasets import tags as t

        try:
            if what == "add":
                op, action = t.add_tags(split_tags(values[0])), f"add {values[0]!r}"
            elif what == "remove":
                op, action = t.remove_tags(split_tags(values[0])), f"remove {values[0]!r}"
            else:
                op, action = (
                    t.replace_tag(values[0].strip(), values[1].strip()),
                    f"replace {values[0]!r} with {values[1]!r}",
                )
            result = t.edit_captions(ds, op, action, selection=entries)
        except Exception as e:
            self.post_message(self.BatchDone(what, f"{type(e).__name__}: {e}", False, []))
            return
        self.post_message(self.BatchDone(action, result_summary(result), result.ok, read_captions(entries)))

    def action_undo(self) -> None:
        ds = self.session.dataset
        if ds is None or self._busy:
            return
        self._busy = True
        self._undo(ds)

    @work(thread=True, group="tags-bulk", exit_on_error=False)
    def _undo(self, ds: Dataset) -> None:
        from nyx_tui.datasets import undo

        try:
            result: UndoResult = undo.undo(ds.root)
        except undo.NothingToUndo as e:
            self.post_message(self.BatchDone("undo", str(e), True, []))
            return
        except Exception as e:
            self.post_message(self.BatchDone("undo", f"{type(e).__name__}: {e}", False, []))
            return
        paths = {*result.restored, *result.unchanged, *result.conflicts}
        touched = [e for e in ds.images if e.caption_path in paths]
        text = f"{len(result.restored)} restored"
        if result.conflicts:
            text += f"; {len(result.conflicts)} edited since, left alone"
        if result.errors:
            text += f"; {len(result.errors)} could not be written ({result.errors[0][1]})"
        self.post_message(self.BatchDone(f"undo: {result.batch.action}", text, result.ok, read_captions(touched)))

    def on_tags_screen_batch_done(self, message: BatchDone) -> None:
        self._busy = False
        ds = self.session.dataset
        if ds is not None and message.captions:
            by_rel = ds.by_rel()
            for rel, caption, stamp in message.captions:
                entry = by_rel.get(rel)
                if entry is not None:
                    entry.caption, entry.stamp = caption, stamp
            self._changed_captions([rel for rel, _, _ in message.captions])
            if self.open_rel in {rel for rel, _, _ in message.captions} and not self.dirty:
                self._reload_if_clean()
        self.notify(
            message.summary, title=message.title, severity="information" if message.ok else "warning", timeout=8
        )


__all__ = ["BulkPrompt", "TagsScreen", "read_captions", "result_summary", "tag_suggestions"]
