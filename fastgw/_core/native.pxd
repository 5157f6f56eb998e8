cdef class NativeCheck:
    cdef object run(self, list headers, bytes peer_ip, bytes client_ip, bytes forwarded_for,
                    bytes consumer)


cdef class KeyAuthCheck(NativeCheck):
    cdef object plugin
    cdef bytes header                     # lower-case


cdef class IpFilterCheck(NativeCheck):
    cdef object plugin
    cdef dict decisions


cdef class AclCheck(NativeCheck):
    cdef object plugin
