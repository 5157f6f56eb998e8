cpdef bytes canonical_path(bytes path, bint keep_escaped_slashes=*)
cpdef bytes canonical_host(bytes host)
