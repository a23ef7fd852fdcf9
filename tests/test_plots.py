"""Figure helpers whose layout could go wrong without failing: labels must not print over each other."""

import itertools

import matplotlib.pyplot as plt

from planer.report.plots import label_points


def test_labels_of_nearby_points_of_other_designs_do_not_overlap():
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    points = [
        (0.45, 2.414, "red", "0.50"),
        (0.452, 2.415, "purple", "0.50"),
        (0.455, 2.409, "green", "par"),
        (0.8, 2.30, "red", "0.90"),
        (0.805, 2.298, "purple", "0.90"),
    ]
    for x, y, color, _ in points:
        ax.scatter([x], [y], color=color)
    label_points(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    plt.close(fig)
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_nearby_points_of_one_design_share_a_label():
    fig, ax = plt.subplots()
    points = [(0.45, 2.414, "red", "0.50"), (0.451, 2.4141, "red", "0.50 s2"), (0.9, 2.3, "red", "0.90")]
    for x, y, color, _ in points:
        ax.scatter([x], [y], color=color)
    label_points(ax, points)
    texts = sorted(t.get_text() for t in ax.texts)
    plt.close(fig)
    assert texts == ["0.50, 0.50 s2", "0.90"]
