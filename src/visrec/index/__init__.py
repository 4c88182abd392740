"""index: the retrieval gallery (Faiss index + labels + metadata) and gallery list files."""

from visrec.index.gallery import Gallery, GalleryMismatchError, GalleryNotFoundError, Hit, UnknownIdError
from visrec.index.listfile import ListEntry, read_list_file, write_list_file

__all__ = ["Gallery", "GalleryMismatchError", "GalleryNotFoundError", "Hit", "ListEntry", "UnknownIdError",
           "read_list_file", "write_list_file"]
