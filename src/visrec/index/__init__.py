"""index: the retrieval gallery (on Faiss files or in Milvus, one contract) and gallery list files.

Open and create galleries with :func:`open_gallery` / :func:`create_gallery` (``visrec.index.factory``):
they work on either backend, so callers never branch on it.
"""

from visrec.index.factory import create_gallery, gallery_version, open_gallery
from visrec.index.gallery import Gallery, GalleryMismatchError, GalleryNotFoundError, Hit, UnknownIdError
from visrec.index.listfile import GalleryListEntry, read_list_file, write_list_file

__all__ = ["Gallery", "GalleryMismatchError", "GalleryNotFoundError", "Hit", "GalleryListEntry", "UnknownIdError",
           "create_gallery", "gallery_version", "open_gallery", "read_list_file", "write_list_file"]
