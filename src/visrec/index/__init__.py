"""index: the retrieval gallery (Faiss index + labels + metadata) and gallery list files."""

from visrec.index.gallery import Gallery, GalleryMismatchError, GalleryNotFoundError, Hit, UnknownIdError
from visrec.index.listfile import GalleryListEntry, read_list_file, write_list_file

__all__ = ["Gallery", "GalleryMismatchError", "GalleryNotFoundError", "Hit", "GalleryListEntry", "UnknownIdError",
           "read_list_file", "write_list_file"]
