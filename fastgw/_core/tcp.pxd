from fastgw._core.timer cimport TimedProtocol
from fastgw._core.upstream cimport Service, Target


cdef class TcpListenerState:
    cdef readonly str name
    cdef readonly object loop
    cdef public Service service           # the default (None: only SNI routes)
    cdef dict sni_exact                   # TLS passthrough: server name -> Service
    cdef dict sni_wildcard                # ... parent domain of "*.parent" -> Service
    cdef public bint accept_proxy         # a PROXY v1/v2 header starts every connection
    cdef public object proxy_trusted      # ... from these peers (ip networks), None = any peer
    cdef public bint proxy_untrusted_plain   # other peers: no header read (else refused)
    cdef public double header_timeout     # ... and must arrive within this
    cdef public double idle_timeout       # no byte either way for this long: closed
    cdef public int max_connections
    cdef public int metric_slot
    cdef public bint draining
    cdef readonly int open_connections
    cdef readonly long long rejected_connections
    cdef readonly set connections

    cdef Service service_for(self, server_name)


cdef class TcpClient(TimedProtocol):
    cdef TcpListenerState listener
    cdef Service service                  # the one in force when the client connected
    cdef object transport
    cdef object upstream_transport        # set once the target accepted
    cdef Target target
    cdef list tried                       # targets this connection tried, in order
    cdef object connect_task
    cdef list pending                     # client bytes that arrived before the target accepted
    cdef Py_ssize_t pending_bytes
    cdef bytes preamble                   # an incomplete PROXY header or ClientHello
    cdef object source                    # the client's (ip, port): the peer, or the PROXY header's
    cdef object dest                      # the address it connected to
    cdef double last_activity
    cdef bint awaiting_proxy
    cdef bint awaiting_hello              # TLS passthrough: the server name picks the service
    cdef bint admitted
    cdef bint counted                     # counted in the target's active connections
    cdef bint client_eof
    cdef bint upstream_done
    cdef bint closed

    cdef void _read_preamble(self, data)
    cdef void _hold(self, data)
    cdef Target _pick(self)
    cdef void _connect_next(self)
    cdef void upstream_made(self, TcpUpstream upstream, object transport)
    cdef void upstream_data(self, data)
    cdef void upstream_eof(self)
    cdef void upstream_lost(self, object exc)
    cdef void _pass_eof(self, transport)
    cdef void _release_target(self)
    cdef void _close(self, bint abort)


cdef class TcpUpstream:
    cdef TcpClient client
