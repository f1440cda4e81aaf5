using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>
/// The libc calls and kernel ABI behind userfaultfd and memfd paging: userfaultfd(2), its ioctls and
/// structs, madvise, fallocate, lseek(SEEK_DATA), poll, eventfd. Nothing here knows of KVM.
/// Numbers and sizes are x86-64, taken from /usr/include/linux/userfaultfd.h (kernel 6.18) and
/// checked with a gcc program (sizeof/offsetof/_IOWR values); <see cref="Userfaultfd"/> re-checks
/// the struct sizes at run time.
/// </summary>
internal static unsafe partial class NativeMemory
{
    private const string Libc = "libc";

    public const long SYS_userfaultfd = 323;

    public const int O_RDWR = 0x2;
    public const int O_NONBLOCK = 0x800;
    public const int O_CLOEXEC = 0x80000;
    public const int EFD_NONBLOCK = O_NONBLOCK;
    public const int EFD_CLOEXEC = O_CLOEXEC;

    public const int MADV_DONTNEED = 4;
    public const int MADV_HUGEPAGE = 14;
    public const int FALLOC_FL_KEEP_SIZE = 0x1;
    public const int FALLOC_FL_PUNCH_HOLE = 0x2;
    public const int SEEK_DATA = 3;
    public const int SEEK_HOLE = 4;

    public const short POLLIN = 0x1;
    public const short POLLERR = 0x8;
    public const short POLLHUP = 0x10;
    public const short POLLNVAL = 0x20;

    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EINTR = 4;
    public const int ENXIO = 6;
    public const int EAGAIN = 11;
    public const int EFAULT = 14;
    public const int EEXIST = 17;
    public const int EINVAL = 22;
    public const int ENOSYS = 38;

    // ---- userfaultfd ioctls (_IOWR/_IOR(0xAA, nr, struct)); values printed by gcc ----
    public const nuint USERFAULTFD_IOC_NEW = 0xAA00;
    public const nuint UFFDIO_API = 0xC018AA3F;
    public const nuint UFFDIO_REGISTER = 0xC020AA00;
    public const nuint UFFDIO_UNREGISTER = 0x8010AA01;
    public const nuint UFFDIO_WAKE = 0x8010AA02;
    public const nuint UFFDIO_COPY = 0xC028AA03;
    public const nuint UFFDIO_ZEROPAGE = 0xC020AA04;
    public const nuint UFFDIO_WRITEPROTECT = 0xC018AA06;
    public const nuint UFFDIO_CONTINUE = 0xC020AA07;

    public const ulong UFFD_API = 0xAA;
    public const byte UFFD_EVENT_PAGEFAULT = 0x12;
    public const ulong UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0;
    public const ulong UFFD_PAGEFAULT_FLAG_WP = 1 << 1;
    public const ulong UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2;

    public const ulong UFFDIO_COPY_MODE_DONTWAKE = 1 << 0;
    public const ulong UFFDIO_COPY_MODE_WP = 1 << 1;
    public const ulong UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0;
    public const ulong UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0;
    public const ulong UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1;
    public const ulong UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0;
    /// <summary>Not in this machine's (older) uapi header; the 6.18 kernel accepts it (measured).</summary>
    public const ulong UFFDIO_CONTINUE_MODE_WP = 1 << 1;

    /// <summary><c>struct uffd_msg</c>: 32 bytes, packed; pagefault.flags at 8, .address at 16, .feat.ptid at 24.</summary>
    public const int UffdMsgSize = 32;
    public const int UffdMsgFlagsOffset = 8;
    public const int UffdMsgAddressOffset = 16;
    public const int UffdMsgPtidOffset = 24;

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioApi { public ulong Api; public ulong Features; public ulong Ioctls; }           // 24

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioRange { public ulong Start; public ulong Len; }                                // 16

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioRegister { public UffdioRange Range; public ulong Mode; public ulong Ioctls; }  // 32

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioCopy { public ulong Dst; public ulong Src; public ulong Len; public ulong Mode; public long Copy; } // 40

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioZeropage { public UffdioRange Range; public ulong Mode; public long Zeropage; } // 32

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioWriteprotect { public UffdioRange Range; public ulong Mode; }                  // 24

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioContinue { public UffdioRange Range; public ulong Mode; public long Mapped; }   // 32

    [StructLayout(LayoutKind.Sequential)]
    public struct PollFd { public int Fd; public short Events; public short Revents; }                 // 8

    /// <summary>syscall(2) with one argument (x86-64 passes it in a register; glibc's wrapper is not really variadic).</summary>
    [LibraryImport(Libc, EntryPoint = "syscall", SetLastError = true)]
    public static partial long Syscall(long number, long arg0);

    [LibraryImport(Libc, EntryPoint = "madvise", SetLastError = true)]
    public static partial int Madvise(nint addr, nuint length, int advice);

    [LibraryImport(Libc, EntryPoint = "fallocate", SetLastError = true)]
    public static partial int Fallocate(int fd, int mode, long offset, long length);

    [LibraryImport(Libc, EntryPoint = "lseek", SetLastError = true)]
    public static partial long Lseek(int fd, long offset, int whence);

    /// <summary>copy_file_range(2); null offsets are not used here (both are always given).</summary>
    [LibraryImport(Libc, EntryPoint = "copy_file_range", SetLastError = true)]
    public static partial nint CopyFileRange(int fdIn, long* offIn, int fdOut, long* offOut, nuint length, uint flags);

    public const int EXDEV = 18;
    public const int EOPNOTSUPP = 95;

    [LibraryImport(Libc, EntryPoint = "poll", SetLastError = true)]
    public static partial int Poll(PollFd* fds, nuint count, int timeoutMs);

    [LibraryImport(Libc, EntryPoint = "read", SetLastError = true)]
    public static partial nint Read(int fd, void* buffer, nuint count);

    [LibraryImport(Libc, EntryPoint = "write", SetLastError = true)]
    public static partial nint Write(int fd, void* buffer, nuint count);

    [StructLayout(LayoutKind.Sequential)]
    public struct Timespec { public long Seconds; public long Nanoseconds; }                          // 16

    [LibraryImport(Libc, EntryPoint = "ppoll", SetLastError = true)]
    public static partial int Ppoll(PollFd* fds, nuint count, Timespec* timeout, void* sigmask);

    [LibraryImport(Libc, EntryPoint = "eventfd", SetLastError = true)]
    public static partial int EventFd(uint initialValue, int flags);
}
