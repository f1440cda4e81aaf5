using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.LibVmm;

/// <summary>
/// Sparse regular files (memory snapshots, swap files): where their data is (lseek(2) SEEK_DATA /
/// SEEK_HOLE) and in-kernel copies between them (copy_file_range(2)). A file system without
/// SEEK_DATA support reports the whole file as data (lseek(2): "the file is considered to consist
/// of one data region"), which callers must accept: the result is then correct, only less sparse.
/// </summary>
public static unsafe class SparseFiles
{
    /// <summary>Largest single copy_file_range request (the kernel caps one call near 2 GiB anyway).</summary>
    private const long MaxCopy = 1L << 30;

    /// <summary>The data ranges of <paramref name="file"/> within [offset, offset+length), in file
    /// order, clipped to the range. Extents are the file system's (a page multiple on tmpfs, ext4, xfs).</summary>
    public static List<(ulong Offset, ulong Length)> DataRanges(SafeFileHandle file, ulong offset, ulong length)
    {
        var result = new List<(ulong, ulong)>();
        var added = false;
        file.DangerousAddRef(ref added);
        try
        {
            var fd = (int)file.DangerousGetHandle();
            var end = offset + length;
            var at = offset;
            while (at < end)
            {
                var data = NativeMemory.Lseek(fd, (long)at, NativeMemory.SEEK_DATA);
                if (data < 0)
                {
                    if (Marshal.GetLastPInvokeError() == NativeMemory.ENXIO) break; // no data after 'at'
                    throw KvmException.Last($"lseek(0x{at:X}, SEEK_DATA)");
                }
                if ((ulong)data >= end) break;
                var hole = NativeMemory.Lseek(fd, data, NativeMemory.SEEK_HOLE);
                if (hole < 0) throw KvmException.Last($"lseek(0x{data:X}, SEEK_HOLE)");
                var stop = Math.Min((ulong)hole, end);
                result.Add(((ulong)data, stop - (ulong)data));
                at = stop;
            }
        }
        finally
        {
            if (added) file.DangerousRelease();
        }
        return result;
    }

    /// <summary>
    /// Copies <paramref name="length"/> bytes from <paramref name="from"/> at <paramref name="fromOffset"/>
    /// to <paramref name="to"/> at <paramref name="toOffset"/>: copy_file_range(2) in the kernel, or, where
    /// the kernel cannot between these two files (EXDEV across file systems, EINVAL/EOPNOTSUPP/ENOSYS),
    /// pread/pwrite through a 1 MiB buffer. A short source (end of file) is an error.
    /// </summary>
    public static void Copy(SafeFileHandle from, long fromOffset, SafeFileHandle to, long toOffset, long length)
    {
        if (length < 0 || fromOffset < 0 || toOffset < 0) throw new ArgumentOutOfRangeException(nameof(length));
        bool addedIn = false, addedOut = false;
        from.DangerousAddRef(ref addedIn);
        to.DangerousAddRef(ref addedOut);
        try
        {
            var fdIn = (int)from.DangerousGetHandle();
            var fdOut = (int)to.DangerousGetHandle();
            while (length > 0)
            {
                long inOff = fromOffset, outOff = toOffset;
                var n = NativeMemory.CopyFileRange(fdIn, &inOff, fdOut, &outOff, (nuint)Math.Min(length, MaxCopy), 0);
                if (n < 0)
                {
                    var errno = Marshal.GetLastPInvokeError();
                    if (errno == NativeMemory.EINTR) continue;
                    if (errno is NativeMemory.EXDEV or NativeMemory.EINVAL or NativeMemory.EOPNOTSUPP or NativeMemory.ENOSYS) break;
                    throw new KvmException($"copy_file_range(0x{fromOffset:X} -> 0x{toOffset:X}, 0x{length:X})", errno);
                }
                if (n == 0) throw new IOException($"copy_file_range: source ends before offset 0x{fromOffset:X} + 0x{length:X}");
                fromOffset += n;
                toOffset += n;
                length -= n;
            }
        }
        finally
        {
            if (addedIn) from.DangerousRelease();
            if (addedOut) to.DangerousRelease();
        }
        if (length > 0) CopyBuffered(from, fromOffset, to, toOffset, length);
    }

    private static void CopyBuffered(SafeFileHandle from, long fromOffset, SafeFileHandle to, long toOffset, long length)
    {
        var buffer = new byte[(int)Math.Min(length, 1 << 20)];
        while (length > 0)
        {
            var want = (int)Math.Min(length, buffer.Length);
            var got = RandomAccess.Read(from, buffer.AsSpan(0, want), fromOffset);
            if (got <= 0) throw new IOException($"read: source ends before offset 0x{fromOffset:X} + 0x{length:X}");
            RandomAccess.Write(to, buffer.AsSpan(0, got), toOffset);
            fromOffset += got;
            toOffset += got;
            length -= got;
        }
    }
}
