import os

import pytest
from helpers import listable_not_enterable

from clipsearch.errors import ClipsearchError
from clipsearch.walk import Walk, normalise_roots, under


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def found_paths(root, **kwargs):
    return sorted(f.path for f in Walk(normalise_roots([root]), **kwargs))


def b(path):
    return os.fsencode(path)


def test_finds_images_by_extension_in_nested_folders(tmp_path):
    keep = [
        touch(tmp_path / "a.jpg"),
        touch(tmp_path / "sub" / "B.JPEG"),
        touch(tmp_path / "sub" / "deep" / "c.webp"),
        touch(tmp_path / "d.png"),
        touch(tmp_path / "e.tiff"),
    ]
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "clip.mov")
    touch(tmp_path / "noext")
    assert found_paths(tmp_path) == sorted(b(p) for p in keep)


def test_skips_hidden_and_junk_folders(tmp_path):
    keep = touch(tmp_path / "photos" / "a.jpg")
    for junk in [
        ".git/x.jpg",
        ".hidden.jpg",
        "node_modules/x.png",
        "@eaDir/x.jpg",
        ".thumbnails/x.png",
        "__MACOSX/x.jpg",
        "photos/.cache/x.jpg",
    ]:
        touch(tmp_path / junk)
    assert found_paths(tmp_path) == [b(keep)]


def test_skips_nas_recycle_bins_and_snapshots(tmp_path):
    """A Synology or QNAP share holds its recycle bin and its snapshots (a whole copy of the
    share each) beside the photos: indexed, deleted photos came back in results and every photo
    several times over (Immich skips the same folders by default)."""
    keep = touch(tmp_path / "photos" / "a.jpg")
    for junk in ["#recycle/a.jpg", "#snapshot/GMT+00_2024.01.01-00.00.00/photos/a.jpg", "@Recycle/a.jpg"]:
        touch(tmp_path / junk)
    touch(tmp_path / "photos" / "@Recently-Snapshot" / "a.jpg")
    assert found_paths(tmp_path) == [b(keep)]


def test_a_hidden_root_named_explicitly_is_walked(tmp_path):
    image = touch(tmp_path / ".photos" / "a.jpg")
    assert found_paths(tmp_path / ".photos") == [b(image)]


def test_size_and_mtime_come_from_the_files_stat(tmp_path):
    image = touch(tmp_path / "a.jpg", b"12345")
    os.utime(image, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (found,) = Walk(normalise_roots([tmp_path]))
    assert (found.size, found.mtime_ns) == (5, 1_600_000_000_123_456_789)


def test_exclude_matches_names_and_full_paths(tmp_path):
    keep = touch(tmp_path / "keep" / "a.jpg")
    touch(tmp_path / "keep" / "b.png")
    touch(tmp_path / "exports" / "c.jpg")
    touch(tmp_path / "raw" / "d.jpg")
    assert found_paths(tmp_path, exclude=("*.png", "*/exports", "raw")) == [b(keep)]


def test_excludes_says_what_a_walk_skipped_for_a_pattern(tmp_path):
    walk = Walk(normalise_roots([tmp_path / "lib", tmp_path / "one.png"]), exclude=("*.png", "*/exports/*", "raw"))
    lib = b(tmp_path / "lib")
    assert walk.excludes(lib + b"/a/b.png")  # its name
    assert walk.excludes(lib + b"/exports/c.jpg")  # its full path
    assert walk.excludes(lib + b"/x/raw/deep/d.jpg")  # a folder on its way down from the root
    assert walk.excludes(b(tmp_path / "one.png"))  # a file named as a root
    assert not walk.excludes(lib + b"/x/rawer/d.jpg") and not walk.excludes(lib + b"/a/b.jpg")
    assert not walk.excludes(b(tmp_path / "elsewhere" / "e.png"))  # not under a root walked
    assert not Walk(normalise_roots([tmp_path / "lib"])).excludes(lib + b"/a/b.png")  # no patterns
    touch(tmp_path / "lib" / "x" / "raw" / "deep" / "d.jpg")
    touch(tmp_path / "lib" / "a" / "b.jpg")
    assert found_paths(tmp_path / "lib", exclude=walk.exclude) == [lib + b"/a/b.jpg"]  # the same verdicts


def test_a_single_file_root(tmp_path):
    image = touch(tmp_path / "a.jpg")
    assert found_paths(image) == [b(image)]


def test_non_utf8_and_odd_names_come_back_byte_for_byte(tmp_path):
    names = [b"caf\xe9.jpg", b"with space.jpg", b"new\nline.jpg", b"quote's \".jpg"]
    for name in names:
        with open(os.path.join(b(tmp_path), name), "wb") as f:
            f.write(b"x")
    assert sorted(os.path.basename(p) for p in found_paths(tmp_path)) == sorted(names)


def test_symlinked_folders_are_followed_only_when_asked(tmp_path):
    outside = touch(tmp_path / "outside" / "x.jpg")
    library = tmp_path / "library"
    touch(library / "a.jpg")
    (library / "link").symlink_to(outside.parent, target_is_directory=True)
    assert found_paths(library) == [b(library / "a.jpg")]
    assert found_paths(library, follow_symlinks=True) == [b(library / "a.jpg"), b(library / "link" / "x.jpg")]


def test_symlink_loops_end(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert found_paths(tmp_path, follow_symlinks=True) == [b(tmp_path / "a" / "x.jpg")]
    assert found_paths(tmp_path) == [b(tmp_path / "a" / "x.jpg")]


def test_a_root_that_is_a_link_to_another_root_is_walked_under_its_own_path(tmp_path):
    """``index photos photos-link``: the second root had been taken for a folder already walked
    and yielded nothing, so every file indexed under it was marked removed."""
    image = touch(tmp_path / "photos" / "a.jpg")
    (tmp_path / "link").symlink_to(image.parent, target_is_directory=True)
    walk = Walk(normalise_roots([tmp_path / "photos", tmp_path / "link"]))
    assert sorted(f.path for f in walk) == [b(tmp_path / "link" / "a.jpg"), b(image)]
    assert walk.unreadable == []


def test_a_link_to_itself_costs_only_itself(tmp_path):
    """Followed, a link to itself cannot be stat'ed (ELOOP): that had dropped the rest of its
    folder's listing, and with it every file the listing had not reached yet."""
    files = [touch(tmp_path / f"{name}.jpg") for name in "abcdefgh"]
    (tmp_path / "self").symlink_to("self")
    walk = Walk(normalise_roots([tmp_path]), follow_symlinks=True)
    assert sorted(f.path for f in walk) == [b(f) for f in files]
    assert walk.unreadable == [b(tmp_path / "self")]


def test_file_symlinks_are_listed_and_broken_ones_reported(tmp_path):
    target = touch(tmp_path / "real.jpg", b"abc")
    (tmp_path / "alias.jpg").symlink_to(target)
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    found = {os.path.basename(f.path): f.size for f in Walk(normalise_roots([tmp_path]))}
    assert found[b"real.jpg"] == found[b"alias.jpg"] == 3
    assert b"broken.jpg" in found


def test_an_unreadable_folder_is_recorded_not_fatal(tmp_path, monkeypatch):
    # Simulated, so it also holds when tests run as root (where chmod 0 does not lock anyone out).
    keep = touch(tmp_path / "ok" / "a.jpg")
    locked = tmp_path / "locked"
    touch(locked / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if path == b(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    walk = Walk(normalise_roots([tmp_path]))
    assert sorted(f.path for f in walk) == [b(keep)]
    assert walk.unreadable == [b(locked)]


def test_a_folder_listed_but_not_entered_is_recorded_not_emptied(tmp_path, monkeypatch):
    """Its files cannot be stat'ed: they had been skipped without a word, as if deleted."""
    keep = touch(tmp_path / "ok" / "a.jpg")
    touch(tmp_path / "locked" / "b.jpg")
    touch(tmp_path / "locked" / "c.jpg")
    (tmp_path / "locked" / "d.jpg").symlink_to(keep)
    listable_not_enterable(monkeypatch, tmp_path / "locked")
    walk = Walk(normalise_roots([tmp_path]))
    assert sorted(f.path for f in walk) == [b(keep)]
    assert walk.unreadable == [b(tmp_path / "locked")]


def test_relative_paths_keep_the_links_the_shell_went_through(tmp_path, monkeypatch):
    """``index ~/photos`` (a link) then ``cd ~/photos && index .``: the second had named the
    folder by its real path, and every photo was indexed twice, each result listed twice."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    link = tmp_path / "home" / "photos"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(link)
    monkeypatch.setenv("PWD", str(link))  # as a shell sets it after `cd`
    assert normalise_roots([".", "sub/", "gone.jpg"]) == [b(link), b(link / "sub"), b(link / "gone.jpg")]
    # ".." is resolved as the kernel does, from the real folder, as before
    assert normalise_roots(["../x"]) == [b(tmp_path / "x")]
    monkeypatch.setenv("PWD", str(tmp_path))  # not the working directory: not trusted
    assert normalise_roots(["."]) == [b(tmp_path / "real")]


def test_a_relative_path_from_a_deleted_folder_says_so(tmp_path, monkeypatch):
    """``index .`` from a folder deleted meanwhile (a drive unplugged and plugged in again) had
    ended in "FileNotFoundError ... (this is a bug)"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ClipsearchError, match="The current folder no longer exists"):
        normalise_roots(["."])
    assert normalise_roots([tmp_path]) == [b(tmp_path)]  # an absolute path needs no current folder


def test_a_path_starting_with_two_slashes_is_the_same_path(tmp_path, monkeypatch):
    """``index //photos`` ("$BASE/$folder" with BASE=/, or ``cd //photos``) had stored every
    photo again under "//..." (normpath keeps two leading slashes), each result then listed twice."""
    assert normalise_roots(["//" + str(tmp_path).lstrip("/") + "/"]) == [b(tmp_path)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", "//" + str(tmp_path).lstrip("/"))  # as bash sets it after `cd //...`
    assert normalise_roots(["a.jpg"]) == [b(tmp_path / "a.jpg")]


def test_folders_to_skip_are_skipped_by_any_path_to_them(tmp_path):
    keep = touch(tmp_path / "photos" / "a.jpg")
    touch(tmp_path / "index" / "thumbnails" / "ab" / "ab12.webp")
    (tmp_path / "photos" / "link").symlink_to(tmp_path / "index", target_is_directory=True)
    skip = (b(tmp_path / "index"),)
    assert sorted(f.path for f in Walk(normalise_roots([tmp_path]), skip=skip, follow_symlinks=True)) == [b(keep)]
    # named as a root, it is walked
    assert len(list(Walk(normalise_roots([tmp_path / "index"]), skip=skip))) == 1


def test_under_tells_inside_from_lookalike_siblings():
    inside = under([b"/photos/2020", b"/single.jpg"])
    assert inside(b"/photos/2020") and inside(b"/photos/2020/a.jpg") and inside(b"/single.jpg")
    assert not inside(b"/photos/2020-old/a.jpg") and not inside(b"/photos/a.jpg")
    assert under([b"/"])(b"/anything")
    assert not under([])(b"/anything")
