# C declarations for the raw reference loops and the UDP load generator
# (bench/_rawloops.pyx): clocks, batched sockets and poll.  The AES-GCM calls
# come from fastpath's declaration files (_ipsecmb.pxd, _libcrypto.pxd): the
# same C API, declared once; the loops call the libraries directly, not the
# engine.


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)
    int nanosleep(const timespec *req, timespec *rem)


# batched UDP send/receive for the load generator and sink
cdef extern from "<sys/socket.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int MSG_DONTWAIT
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, timespec *tmo)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN
    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR
    int ENOBUFS
