using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>
/// The swap file: a direct-mapped, sparse file where guest RAM page <c>p</c> lives at offset
/// <c>p * 4096</c> while it is swapped out (the file's holes cost nothing). Created (truncated) when
/// the vmspace starts paging, deleted when it is closed. Knows nothing of the pmap: what is in the
/// file is only meaningful for the pages the pmap says are swapped.
/// </summary>
internal sealed class SwapStore(string path) : IDisposable
{
    private const ulong Page = RamPages.PageSize;

    /// <summary>Pages per write (1 MiB): longer runs of a swap-out are split.</summary>
    public const ulong MaxRunPages = 256;

    private readonly SafeFileHandle _file =
        File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite, FileShare.None, FileOptions.DeleteOnClose);

    /// <summary>The file (for copying swapped pages into a memory snapshot).</summary>
    internal SafeFileHandle Handle => _file;

    /// <summary>Where page <paramref name="page"/> lives in the file (the pmap records it).</summary>
    public static ulong Offset(ulong page) => page * Page;

    /// <summary>Saves whole pages from <paramref name="firstPage"/> on: <paramref name="contents"/> is a
    /// multiple of 4 KiB.</summary>
    public void Write(ulong firstPage, ReadOnlySpan<byte> contents)
    {
        if (contents.Length % (int)Page != 0) throw new ArgumentException($"a swap write of {contents.Length} bytes is not whole pages");
        RandomAccess.Write(_file, contents, (long)Offset(firstPage));
    }

    /// <summary>Reads one saved page into <paramref name="into"/> (4 KiB). A hole reads as zeros; a page
    /// past the file's end is a short read (<see cref="VmspaceException"/>).</summary>
    public void Read(ulong page, Span<byte> into)
    {
        var n = RandomAccess.Read(_file, into, (long)Offset(page));
        if (n != into.Length) throw new VmspaceException($"swap file: short read of page {page} ({n} bytes)");
    }

    public void Dispose() => _file.Dispose();
}
