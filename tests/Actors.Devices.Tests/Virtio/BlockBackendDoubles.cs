using System.Runtime.InteropServices;
using ActorVmm.Devices.Virtio;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>Reads a file through its own open(2) and pread(2), outside .NET's advisory flock, so a test
/// can look at a disk image while a <see cref="FileBlockBackend"/> holds it open exclusively.</summary>
internal static unsafe partial class RawFile
{
    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "pread", SetLastError = true)]
    private static partial nint Pread(int fd, byte* buffer, nuint count, long offset);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "truncate", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int NativeTruncate(string path, long length);

    /// <summary>Cuts the file to <paramref name="length"/> bytes behind its holder's back (truncate(2)).</summary>
    public static void Truncate(string path, long length)
    {
        if (NativeTruncate(path, length) != 0) throw new IOException($"truncate {path}: errno {Marshal.GetLastPInvokeError()}");
    }

    public static byte[] Read(string path, long offset, int length)
    {
        var fd = Open(path, 0);
        if (fd < 0) throw new IOException($"open {path}: errno {Marshal.GetLastPInvokeError()}");
        try
        {
            var result = new byte[length];
            var done = 0;
            fixed (byte* p = result)
            {
                while (done < length)
                {
                    var n = Pread(fd, p + done, (nuint)(length - done), offset + done);
                    if (n < 0) throw new IOException($"pread {path}: errno {Marshal.GetLastPInvokeError()}");
                    if (n == 0) break;
                    done += (int)n;
                }
            }
            return result[..done];
        }
        finally
        {
            Close(fd);
        }
    }
}

/// <summary>
/// A store that passes every call to a real one and records it, with the used index the driver could
/// see at that moment, so a test can tell what reached the file before a request was acknowledged.
/// <see cref="Fail"/> makes every call throw an <see cref="IOException"/> instead, as a failing host
/// disk would (EIO), without touching the store.
/// </summary>
internal sealed class RecordingBackend(IBlockBackend inner, Func<ushort> usedIdx) : IBlockBackend
{
    public sealed record Call(string Op, long Offset, long Length, ushort UsedIdxAtCall);

    public List<Call> Calls { get; } = [];
    public bool Fail { get; set; }

    public long Length => inner.Length;
    public bool ReadOnly => inner.ReadOnly;

    public int Read(long offset, Span<byte> destination)
    {
        Record("read", offset, destination.Length);
        return inner.Read(offset, destination);
    }

    public void Write(long offset, ReadOnlySpan<byte> source)
    {
        Record("write", offset, source.Length);
        inner.Write(offset, source);
    }

    public long Read(long offset, IReadOnlyList<Memory<byte>> destinations)
    {
        Record("read", offset, destinations.Sum(d => (long)d.Length));
        return inner.Read(offset, destinations);
    }

    public void Write(long offset, IReadOnlyList<ReadOnlyMemory<byte>> sources)
    {
        Record("write", offset, sources.Sum(d => (long)d.Length));
        inner.Write(offset, sources);
    }

    public void Flush()
    {
        Record("flush", 0, 0);
        inner.Flush();
    }

    public void Discard(long offset, long length)
    {
        Record("discard", offset, length);
        inner.Discard(offset, length);
    }

    public void WriteZeroes(long offset, long length, bool mayUnmap)
    {
        Record(mayUnmap ? "zero-unmap" : "zero", offset, length);
        inner.WriteZeroes(offset, length, mayUnmap);
    }

    public void Dispose() => inner.Dispose();

    private void Record(string op, long offset, long length)
    {
        if (Fail) throw new IOException("Input/output error (simulated)");
        Calls.Add(new Call(op, offset, length, usedIdx()));
    }
}
