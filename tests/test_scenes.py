import numpy as np
import pytest
from PIL import Image

from clipsearch.training.scenes import COLOURS, POSITIONS, SHAPES, SIZES, SceneGenerator, read_manifest, write_scenes


@pytest.fixture(scope="module")
def scenes():
    return SceneGenerator(seed=7).take(300)


def test_same_seed_and_index_give_the_same_scene_in_any_order():
    forward = SceneGenerator(seed=3).take(5)
    backward = [SceneGenerator(seed=3)[i] for i in reversed(range(5))][::-1]
    for a, b in zip(forward, backward):
        assert a.captions == b.captions
        assert a.objects == b.objects
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_different_seeds_give_different_scenes():
    a, b = SceneGenerator(seed=1).take(20), SceneGenerator(seed=2).take(20)
    assert [s.caption for s in a] != [s.caption for s in b]


def test_images_have_the_requested_resolution_and_are_rgb():
    for resolution in (64, 96):
        image = SceneGenerator(seed=0, resolution=resolution)[0].image
        assert image.mode == "RGB" and image.size == (resolution, resolution)


def test_ground_truth_uses_the_known_vocabulary(scenes):
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES and obj.position in POSITIONS


def test_every_kind_of_scene_and_attribute_occurs(scenes):
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3}
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert {s.background.split()[0] for s in scenes} >= {"striped", "checked", "dotted", "grey", "beige"}


def test_caption_names_every_object_with_its_colour_and_shape(scenes):
    for scene in scenes:
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in scene.caption or f"{obj.colour} {obj.shape}" in _singular(
                scene.caption
            )
        assert scene.caption.endswith(f"on a {scene.background} background")


def test_counts_and_relations_in_captions_match_the_layout(scenes):
    for scene in scenes:
        objs = scene.objects
        if scene.caption.startswith(("two ", "three ")):
            expected = {"two": 2, "three": 3}[scene.caption.split()[0]]
            assert len(objs) == expected and len({(o.shape, o.colour) for o in objs}) == 1
        if " to the left of " in scene.caption:
            left, right = objs
            assert left.box[2] <= right.box[0] + 2 and left.position == "left" and right.position == "right"
        if " above " in scene.caption:
            top, bottom = objs
            assert top.box[3] <= bottom.box[1] + 2 and top.position == "top"


def test_position_words_match_where_the_object_is_drawn(scenes):
    for scene in scenes:
        if len(scene.objects) != 1:
            continue
        (obj,) = scene.objects
        side = scene.image.width
        cx, cy = (obj.box[0] + obj.box[2]) / 2 / side, (obj.box[1] + obj.box[3]) / 2 / side
        where = {
            "left": cx < 0.4,
            "right": cx > 0.6,
            "top": cy < 0.4,
            "bottom": cy > 0.6,
            "centre": 0.4 < cx < 0.6 and 0.4 < cy < 0.6,
        }
        assert where[obj.position]


def test_object_pixels_have_the_named_colour(scenes):
    for scene in scenes[:60]:
        pixels = np.asarray(scene.image).astype(float)
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            cx, cy = (left + right) // 2, (top + bottom) // 2  # inside every shape, even a star
            rgb = pixels[cy, cx]
            nearest = min(COLOURS, key=lambda name: np.linalg.norm(np.array(COLOURS[name]) - rgb))
            assert nearest == obj.colour, (scene.caption, obj)


def test_paraphrases_are_distinct_and_mention_only_present_objects(scenes):
    for scene in scenes:
        assert len(set(scene.captions)) == len(scene.captions)
        for text in scene.paraphrases:
            for colour in COLOURS:
                if f" {colour} " in f" {text} ":
                    assert scene.contains(colour=colour), (text, scene.caption)


def test_write_scenes_makes_a_manifest_that_matches_the_generator(tmp_path):
    manifest = write_scenes(tmp_path / "scenes", count=12, seed=5)
    records = read_manifest(manifest)
    expected = SceneGenerator(seed=5).take(12)
    assert len(records) == 12
    for record, scene in zip(records, expected):
        assert record["caption"] == scene.caption
        assert [o["shape"] for o in record["objects"]] == [o.shape for o in scene.objects]
        with Image.open(record["path"]) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(scene.image))


def _singular(caption: str) -> str:
    for shape in SHAPES:
        caption = caption.replace(f"{shape}es", shape).replace(f"{shape}s", shape)
    return caption


def _changes(a, b) -> str:
    """Which single respect a hard negative changed, or "" if none or several."""
    if [o.position for o in a.objects] != [o.position for o in b.objects]:
        if len(a.objects) == 1 and (a.objects[0].shape, a.objects[0].colour, a.objects[0].size) == (
            b.objects[0].shape,
            b.objects[0].colour,
            b.objects[0].size,
        ):
            return "position"
        return ""
    kinds = {
        kind
        for x, y in zip(a.objects, b.objects)
        for kind in ("shape", "colour", "size")
        if getattr(x, kind) != getattr(y, kind)
    }
    if len(kinds) == 1:
        return kinds.pop()
    swapped = [(o.shape, o.colour, o.size) for o in reversed(b.objects)]
    return "places" if len(a.objects) == 2 and swapped == [(o.shape, o.colour, o.size) for o in a.objects] else ""


def test_hard_negative_changes_one_respect_on_the_same_background():
    generator = SceneGenerator(seed=4)
    seen = set()
    for index in range(300):
        scene, negative = generator[index], generator.hard_negative(index)
        change = _changes(scene, negative)
        assert change, (scene.caption, negative.caption)
        seen.add(change)
        assert negative.caption != scene.caption and negative.background == scene.background
        # Outside both scenes' objects the pixels are the same: the texture is shared.
        outside = np.ones(scene.image.size, dtype=bool)
        for obj in (*scene.objects, *negative.objects):
            left, top, right, bottom = obj.box
            outside[max(0, top - 1) : bottom + 2, max(0, left - 1) : right + 2] = False
        assert np.array_equal(np.asarray(scene.image)[outside], np.asarray(negative.image)[outside])
        assert negative.objects == generator.hard_negative(index).objects  # deterministic
    assert seen == {"shape", "colour", "size", "position", "places"}


def test_a_scene_has_three_distinct_hard_negatives_whose_captions_come_without_drawing():
    generator = SceneGenerator(seed=6)
    for index in range(100):
        captions = [generator.captions(index), *(generator.captions(index, k) for k in range(3))]
        assert len({c[0] for c in captions}) == 4
        assert captions[0] == generator[index].captions
        assert captions[2] == generator.hard_negative(index, 1).captions


def test_objects_sit_in_the_cells_of_a_three_by_three_grid(scenes):
    side = scenes[0].image.width
    cell = side / 3
    for scene in scenes:
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            column, row = int((left + right) / 2 // cell), int((top + bottom) / 2 // cell)
            assert column * cell - 2 <= left and right <= (column + 1) * cell + 2, (scene.caption, obj)
            assert row * cell - 2 <= top and bottom <= (row + 1) * cell + 2, (scene.caption, obj)


def test_single_objects_generator_gives_one_object_scenes():
    generator = SceneGenerator(seed=3, single_objects=True)
    assert all(len(generator[i].objects) == 1 for i in range(50))
    assert all(len(generator.hard_negative(i, 2).objects) == 1 for i in range(50))


# --- varied scenes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied():
    return SceneGenerator(seed=11, resolution=64, style="varied").take(300)


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError, match="style"):
        SceneGenerator(style="cubist")


def test_varied_scenes_are_deterministic_in_any_order():
    generator = SceneGenerator(seed=3, resolution=64, style="varied")
    forward = [generator[i] for i in range(6)]
    backward = [SceneGenerator(seed=3, resolution=64, style="varied")[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert a.captions == b.captions and a.objects == b.objects
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def _kept_square(image):
    """Left, top and side of the central square that CLIP's centre crop keeps."""
    side = min(image.size)
    return (image.width - side) / 2, (image.height - side) / 2, side


def test_varied_frames_and_objects_span_sizes_places_and_aspects(varied):
    sizes = {scene.image.size for scene in varied}
    assert any(w != h for w, h in sizes) and len({min(s) for s in sizes}) == 3
    sides = []
    for scene in varied:
        left, top, side = _kept_square(scene.image)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            # Inside the part the centre crop keeps (rounding and line width aside).
            assert left - 3 <= x0 and x1 <= left + side + 3 and top - 3 <= y0 and y1 <= top + side + 3, obj
        if len(scene.objects) == 1:
            x0, y0, x1, y1 = scene.objects[0].box
            sides.append(max(x1 - x0, y1 - y0) / side)
    assert min(sides) < 0.15 and max(sides) > 0.85


def test_varied_position_and_size_words_match_the_drawing(varied):
    checked = 0
    for scene in varied:
        # Shapes whose box is centred on the point they are placed at.
        if len(scene.objects) != 1 or scene.objects[0].shape not in ("circle", "square", "cross"):
            continue
        (obj,) = scene.objects
        checked += 1
        left, top, side = _kept_square(scene.image)
        x = ((obj.box[0] + obj.box[2]) / 2 - left) / side
        y = ((obj.box[1] + obj.box[3]) / 2 - top) / side
        dx, dy = x - 0.5, y - 0.5
        if max(abs(dx), abs(dy)) < 1 / 6 - 0.03:
            assert obj.position == "centre", (scene.caption, x, y)
        elif abs(abs(dx) - abs(dy)) > 0.05 and max(abs(dx), abs(dy)) > 1 / 6 + 0.03:
            expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
            assert obj.position == expected, (scene.caption, x, y)
        extent = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) / side
        if extent > 0.5:
            assert obj.size == "large", scene.caption
        elif extent < 0.3:
            assert obj.size == "small", scene.caption
    assert checked >= 40


def test_varied_captions_name_objects_but_no_background(varied):
    for scene in varied:
        assert scene.background == "" and "background" not in " ".join(scene.captions)
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in _singular(scene.caption)


def test_varied_objects_stand_out_and_are_drawn_in_their_colour(varied):
    """A filled circle's centre pixel is a rendering of its colour name: nearer to one of that
    name's renderings than to any other name's."""
    from clipsearch.training.scenes import PALETTE

    checked = 0
    for scene in varied:
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            if obj.shape != "circle" or x1 - x0 < 12:
                continue
            pixel = np.asarray(scene.image.convert("RGB"))[(y0 + y1) // 2, (x0 + x1) // 2].astype(float)
            # An outlined circle is hollow: its centre shows the background.
            centre_is_line = min(np.linalg.norm(pixel - rgb) for rgb in PALETTE[obj.colour]) < 60
            if centre_is_line:
                nearest = min(PALETTE, key=lambda name: min(np.linalg.norm(pixel - rgb) for rgb in PALETTE[name]))
                checked += 1
                assert nearest == obj.colour or min(np.linalg.norm(pixel - rgb) for rgb in PALETTE[obj.colour]) < 45, (
                    scene.caption,
                    pixel,
                )
    assert checked >= 20


def test_varied_hard_negatives_change_one_respect_on_the_same_background():
    generator = SceneGenerator(seed=9, resolution=64, style="varied")
    seen = set()
    for index in range(200):
        scene, negative = generator[index], generator.hard_negative(index)
        change = _changes(scene, negative)
        assert change, (scene.caption, negative.caption)
        seen.add(change)
        assert negative.caption != scene.caption and negative.image.size == scene.image.size
    assert seen == {"shape", "colour", "size", "position", "places"}


def test_a_mixed_stream_holds_both_styles():
    generator = SceneGenerator(seed=2, resolution=64, style="mixed")
    classic = sum(generator[i].background != "" for i in range(200))
    assert 40 <= classic <= 80  # 30% of 200


def test_photos_carry_a_date_and_an_orientation_their_pixels_obey(tmp_path):
    from PIL import ExifTags, ImageOps

    manifest = write_scenes(tmp_path, count=12, seed=1, resolution=64, style="varied", photos=True)
    generator = SceneGenerator(seed=1, resolution=64, style="varied")
    orientations = set()
    for record in read_manifest(manifest):
        index = int(record["path"].rsplit("_", 1)[1].split(".")[0])
        with Image.open(record["path"]) as image:
            if index % 3 != 2:
                assert image.format == "PNG"
                continue
            assert image.format == "JPEG"
            exif = image.getexif()
            taken = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal]
            assert taken.startswith("2024:05:") or taken.startswith("2024:06:")
            orientations.add(exif.get(ExifTags.Base.Orientation, 1))
            upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=float)
        expected = np.asarray(generator[index].image, dtype=float)
        assert upright.shape == expected.shape and np.abs(upright - expected).mean() < 12
    assert orientations == {1, 3, 6, 8}
