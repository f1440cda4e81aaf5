using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Devices.Virtio;

/// <summary>
/// The storage behind a virtio-blk device: a byte-addressed store of a fixed <see cref="Length"/>.
/// Every method returns only when the operation has reached the store (a write has been handed to the
/// host kernel, a flush is on stable storage), so a caller may acknowledge it then. A host I/O error is
/// an <see cref="IOException"/>; nothing else is expected to be thrown for a range inside
/// <see cref="Length"/>.
/// </summary>
public interface IBlockBackend : IDisposable
{
    /// <summary>Size of the store in bytes, fixed when it was opened.</summary>
    long Length { get; }

    /// <summary>True if the store was opened read-only: <see cref="Write"/>, <see cref="Discard"/> and
    /// <see cref="WriteZeroes"/> fail.</summary>
    bool ReadOnly { get; }

    /// <summary>Reads up to destination.Length bytes at <paramref name="offset"/>; returns how many were
    /// read (fewer only at the end of the underlying file).</summary>
    int Read(long offset, Span<byte> destination);

    /// <summary>Writes all of <paramref name="source"/> at <paramref name="offset"/>.</summary>
    void Write(long offset, ReadOnlySpan<byte> source);

    /// <summary>Reads the bytes at <paramref name="offset"/> into <paramref name="destinations"/> in order,
    /// as one request (preadv); returns how many were read (fewer only at the end of the underlying file).</summary>
    long Read(long offset, IReadOnlyList<Memory<byte>> destinations);

    /// <summary>Writes the bytes of <paramref name="sources"/> in order at <paramref name="offset"/>, as one
    /// request (pwritev).</summary>
    void Write(long offset, IReadOnlyList<ReadOnlyMemory<byte>> sources);

    /// <summary>Commits every completed write to stable storage (fdatasync/fsync).</summary>
    void Flush();

    /// <summary>The range's contents no longer matter: the store may deallocate it (or do nothing).</summary>
    void Discard(long offset, long length);

    /// <summary>The range reads as zeroes afterwards; <paramref name="mayUnmap"/> lets the store
    /// deallocate it to get there.</summary>
    void WriteZeroes(long offset, long length, bool mayUnmap);
}

/// <summary>
/// A host file as a block store, through pread/pwrite and preadv/pwritev (<see cref="RandomAccess"/> on a
/// <see cref="SafeFileHandle"/>), fsync for <see cref="Flush"/>, fallocate(2) PUNCH_HOLE for discards
/// and ZERO_RANGE for zeroing (falling back to writing zeroes where the file system has neither).
/// The length is the file's at open; the device exposes whole 512-byte sectors of it.
/// </summary>
public sealed partial class FileBlockBackend : IBlockBackend
{
    private const int FallocKeepSize = 0x01;
    private const int FallocPunchHole = 0x02;
    private const int FallocZeroRange = 0x10;
    private const int ZeroChunk = 64 * 1024;

    private readonly SafeFileHandle _file;

    public long Length { get; }
    public bool ReadOnly { get; }
    public string Path { get; }

    private FileBlockBackend(SafeFileHandle file, string path, bool readOnly)
    {
        _file = file;
        Path = path;
        ReadOnly = readOnly;
        Length = RandomAccess.GetLength(file);
    }

    /// <summary>Opens an existing file (read-only if <paramref name="readOnly"/>). Throws the usual
    /// file exceptions (FileNotFoundException, UnauthorizedAccessException, IOException): a disk that
    /// cannot be opened is a configuration error, reported before the VM starts.</summary>
    public static FileBlockBackend Open(string path, bool readOnly)
    {
        var file = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite,
            readOnly ? FileShare.Read : FileShare.None);
        return new FileBlockBackend(file, path, readOnly);
    }

    public int Read(long offset, Span<byte> destination)
    {
        var done = 0;
        while (done < destination.Length)
        {
            var n = RandomAccess.Read(_file, destination[done..], offset + done);
            if (n == 0) break;
            done += n;
        }
        return done;
    }

    public void Write(long offset, ReadOnlySpan<byte> source)
    {
        ThrowIfReadOnly();
        RandomAccess.Write(_file, source, offset);
    }

    public long Read(long offset, IReadOnlyList<Memory<byte>> destinations)
    {
        var done = 0L;
        var rest = destinations;
        while (rest.Count > 0)
        {
            var n = RandomAccess.Read(_file, rest, offset + done);
            if (n == 0) break;
            done += n;
            rest = After(rest, n);
        }
        return done;
    }

    public void Write(long offset, IReadOnlyList<ReadOnlyMemory<byte>> sources)
    {
        ThrowIfReadOnly();
        RandomAccess.Write(_file, sources, offset); // writes everything (it repeats a short pwritev)
    }

    /// <summary>The buffers after their first <paramref name="skip"/> bytes (a short preadv's rest).</summary>
    private static List<Memory<byte>> After(IReadOnlyList<Memory<byte>> buffers, long skip)
    {
        var rest = new List<Memory<byte>>(buffers.Count);
        foreach (var b in buffers)
        {
            if (skip >= b.Length)
            {
                skip -= b.Length;
                continue;
            }
            rest.Add(b[(int)skip..]);
            skip = 0;
        }
        return rest;
    }

    public void Flush() => RandomAccess.FlushToDisk(_file);

    public void Discard(long offset, long length)
    {
        ThrowIfReadOnly();
        // Advisory (virtio 1.2 §5.2.6.2: the device MAY deallocate): a file system without hole
        // punching keeps the data, which is allowed.
        Fallocate(FallocPunchHole | FallocKeepSize, offset, length);
    }

    public void WriteZeroes(long offset, long length, bool mayUnmap)
    {
        ThrowIfReadOnly();
        if (mayUnmap && Fallocate(FallocPunchHole | FallocKeepSize, offset, length)) return;
        if (Fallocate(FallocZeroRange | FallocKeepSize, offset, length)) return;
        Span<byte> zeroes = new byte[(int)Math.Min(ZeroChunk, Math.Max(length, 1))];
        for (var done = 0L; done < length;)
        {
            var n = (int)Math.Min(zeroes.Length, length - done);
            RandomAccess.Write(_file, zeroes[..n], offset + done);
            done += n;
        }
    }

    public void Dispose() => _file.Dispose();

    private void ThrowIfReadOnly()
    {
        if (ReadOnly) throw new IOException($"{Path} is open read-only");
    }

    /// <summary>fallocate(2) on the file; false if the file system does not support the mode
    /// (EOPNOTSUPP); any other failure is an <see cref="IOException"/>.</summary>
    private bool Fallocate(int mode, long offset, long length)
    {
        if (length == 0) return true;
        var added = false;
        try
        {
            _file.DangerousAddRef(ref added);
            if (NativeFallocate((int)_file.DangerousGetHandle(), mode, offset, length) == 0) return true;
        }
        finally
        {
            if (added) _file.DangerousRelease();
        }
        var errno = Marshal.GetLastPInvokeError();
        if (errno is Eopnotsupp or Enosys) return false;
        throw new IOException($"fallocate({Path}, 0x{mode:X}, {offset}, {length}) failed: errno {errno} ({Marshal.GetPInvokeErrorMessage(errno)})");
    }

    private const int Eopnotsupp = 95;
    private const int Enosys = 38;

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int NativeFallocate(int fd, int mode, long offset, long length);
}
