# fastgw/_core/timer.pyx: the deadline base class of the connection protocols. Its deadline
# methods are C-level (timer.pxd); Python sees only the class, as a base of TcpClient,
# Downstream and UpstreamConnection.

class TimedProtocol: ...
