using ActorVmm.LibVmm;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>
/// Where a vmspace restores guest memory from (<see cref="VmspaceOptions.Restore"/>): a memory file
/// written by <see cref="VmspaceProtocol.SaveMemory"/> and, optionally, the A/D file written with it.
/// <para><paramref name="Lazy"/> (the default): nothing is read up front; the guest's first touch of a
/// RAM page is a userfaultfd MISSING fault that the vmspace fills from the file (pread, UFFDIO_COPY);
/// pages that are holes in the file are zero pages, as in a fresh VM. Without demand paging in the
/// options, the vmspace registers userfaultfd for MISSING faults only, for as long as some page of the
/// file has not been brought in, then unregisters it and closes the file (from then on it is an
/// unpaged vmspace). Eager: every data extent of the file is copied into guest memory before the
/// vmspace answers <see cref="VmspaceProtocol.AwaitReady"/>.</para>
/// <para>Either way, a restore replaces all guest memory (RAM the builder wrote is discarded) and
/// copies the firmware part at once (read-only memory is not demand-paged).</para>
/// </summary>
public sealed record MemoryRestore(string Path, bool Lazy = true, string? AccessedDirtyPath = null);

/// <summary>A memory file or A/D file that cannot be restored (wrong size, unreadable, malformed).</summary>
public sealed class MemoryImageException(string message) : Devices.InvariantViolationException(message);

/// <summary>
/// The memory file's format: a sparse file whose length is <see cref="Length"/>. Guest RAM comes
/// first, page <c>p</c> (RAM pages numbered in guest-physical order, the order of the RAM memfd in
/// <see cref="VmspaceLayout"/>) at offset <c>p × 4096</c>; then each read-only backing (the firmware
/// memfd; its low alias shares it) whole, in the order the map first uses it. Pages never touched are
/// holes. The A/D file: the 8 bytes "AVMMAD01", the RAM page count (u64, little endian), then one
/// byte per RAM page (<see cref="PageAD"/>: bit 0 accessed, bit 1 dirty).
/// </summary>
public static class MemoryImage
{
    public const ulong PageSize = 4096;
    internal static ReadOnlySpan<byte> AdMagic => "AVMMAD01"u8;
    internal const int AdHeader = 16;

    /// <summary>The length a memory file of <paramref name="memory"/> has (RAM + read-only backings).</summary>
    public static ulong Length(GuestMemoryMap memory) =>
        new RamPages(memory).Total * PageSize + ReadOnlyParts(memory).Aggregate(0UL, (a, p) => a + p.Region.Size);

    /// <summary>Checks a restore source against <paramref name="memory"/> without changing anything:
    /// null if it can be restored, else why not (the file is missing, its length is not the guest
    /// memory's, the A/D file is malformed or for another page count). For a VM builder's early error.</summary>
    public static string? Check(GuestMemoryMap memory, MemoryRestore restore)
    {
        try
        {
            using var file = File.OpenHandle(restore.Path, FileMode.Open, FileAccess.Read);
            CheckLength(memory, file, restore.Path);
            if (restore.AccessedDirtyPath is { } ad) ReadAccessedDirty(ad, new RamPages(memory).Total);
            return null;
        }
        catch (Exception e) when (e is MemoryImageException or IOException or UnauthorizedAccessException)
        {
            return e.Message;
        }
    }

    internal static void CheckLength(GuestMemoryMap memory, SafeFileHandle file, string path)
    {
        var want = Length(memory);
        var have = (ulong)RandomAccess.GetLength(file);
        if (have != want)
            throw new MemoryImageException(
                $"memory file {path} is {have} bytes but this VM's memory is {want} bytes ({new RamPages(memory).Total * PageSize} of RAM" +
                $"{(want > new RamPages(memory).Total * PageSize ? $" + {want - new RamPages(memory).Total * PageSize} of firmware" : "")}): " +
                "the memory size (or firmware) differs from the saved VM's");
    }

    /// <summary>The read-only backings (firmware) in the file's order, with their file offsets.</summary>
    internal static List<(MemfdRegion Region, ulong FileOffset)> ReadOnlyParts(GuestMemoryMap memory)
    {
        var ram = memory.Segments.Where(s => !s.ReadOnly).Select(s => s.Backing).ToHashSet();
        var at = new RamPages(memory).Total * PageSize;
        var parts = new List<(MemfdRegion, ulong)>();
        foreach (var region in memory.Segments.Where(s => s.ReadOnly).Select(s => s.Backing).Distinct())
        {
            if (ram.Contains(region)) continue;
            parts.Add((region, at));
            at += region.Size;
        }
        return parts;
    }

    internal static void WriteAccessedDirty(string path, PageAD[] pages)
    {
        var bytes = new byte[AdHeader + pages.Length];
        AdMagic.CopyTo(bytes);
        BitConverter.TryWriteBytes(bytes.AsSpan(8), (ulong)pages.Length);
        for (var i = 0; i < pages.Length; i++) bytes[AdHeader + i] = (byte)pages[i];
        File.WriteAllBytes(path, bytes);
    }

    /// <summary>Reads an A/D file of <paramref name="ramPages"/> pages; throws <see cref="MemoryImageException"/> if malformed.</summary>
    public static PageAD[] ReadAccessedDirty(string path, ulong ramPages)
    {
        byte[] bytes;
        try { bytes = File.ReadAllBytes(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new MemoryImageException($"A/D file {path}: {e.Message}"); }
        if (bytes.Length < AdHeader || !bytes.AsSpan(0, 8).SequenceEqual(AdMagic))
            throw new MemoryImageException($"A/D file {path} is not an A/D file (no AVMMAD01 header)");
        var count = BitConverter.ToUInt64(bytes, 8);
        if (count != ramPages || (ulong)bytes.Length != AdHeader + count)
            throw new MemoryImageException($"A/D file {path} holds {count} pages ({bytes.Length} bytes) but this VM has {ramPages} RAM pages");
        var result = new PageAD[count];
        for (var i = 0; i < result.Length; i++)
        {
            var b = bytes[AdHeader + i];
            if ((b & ~3) != 0) throw new MemoryImageException($"A/D file {path}: page {i} has bits 0x{b:X2} (only accessed=1, dirty=2)");
            result[i] = (PageAD)b;
        }
        return result;
    }
}
