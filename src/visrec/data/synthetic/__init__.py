"""The embedded default data set: procedurally drawn bird-like objects in the CUB layout.

The project cannot download CUB at run time, so by default it generates a look-alike:
``<dest_parent>/CUB_200_2011`` with ``images/NNN.Name/*.jpg`` and the five CUB metadata
files. Each class is a fixed *recipe* (family shape, part colours, patterns, proportions);
each image draws one instance of it at a random pose over a cluttered background.

Retrieval of unseen classes has to be a real task: colours come from one shared palette
(classes differ by which part wears which colour and by shape and pattern), backgrounds
and clutter reuse the bird colours, and lighting and colour jitter move the global colour
statistics, so neither a colour histogram nor a random network solves it, while a trained
network can learn the part structure.

Every image is a pure function of ``(seed, class id, image index)``: the output is
byte-identical whatever the number of worker processes.

The modules, in the order an image is made:

* ``recipes``: the palette, habitats, body plans, and one recipe per class;
* ``bird_shapes``: a recipe -> the bird's drawing list in object coordinates (``geometry``: polygon helpers);
* ``scene``: backdrop, clutter, occluders, texture and lighting around and over the bird;
* ``render``: one posed, drawn image and its object mask;
* ``writer``: ``generate``, the whole data set on disk (the entry point, exported here).
"""

from visrec.data.synthetic.writer import generate

__all__ = ["generate"]
