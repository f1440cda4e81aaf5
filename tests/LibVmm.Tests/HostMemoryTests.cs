using System.Globalization;

namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// Host memory for passthru-style devices: shared regions over real files (and memfds) that file
/// I/O and the mapping both see, and wiring (mlock) checked against RLIMIT_MEMLOCK.
/// </summary>
public sealed class HostMemoryTests : IDisposable
{
    private const ulong Page = 4096;
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-hostmem-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>The "Locked:" bytes /proc/self/smaps reports for the mapping that starts at <paramref name="address"/>.</summary>
    private static ulong LockedBytes(nint address)
    {
        var inMapping = false;
        foreach (var line in File.ReadLines("/proc/self/smaps"))
        {
            var dash = line.IndexOf('-');
            if (dash > 0 && ulong.TryParse(line[..dash], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out var start))
            {
                inMapping = start == (ulong)address;
                continue;
            }
            if (inMapping && line.StartsWith("Locked:", StringComparison.Ordinal))
                return ulong.Parse(line[7..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) << 10;
        }
        throw new InvalidOperationException($"no mapping starts at 0x{address:X} in /proc/self/smaps");
    }

    [Fact]
    public void A_refusal_names_the_limit_and_what_to_change()
    {
        var tight = new MemoryLock.Allowance(Limit: 8 << 20, HasCapIpcLock: false, Locked: 1 << 20);
        Assert.Null(tight.Refusal(7 << 20));
        var why = tight.Refusal(8 << 20);
        Assert.NotNull(why);
        Assert.Contains("RLIMIT_MEMLOCK allows 8192 KiB (1024 KiB locked already)", why);
        Assert.Contains("ulimit -l", why);
        Assert.Contains("CAP_IPC_LOCK", why);
        Assert.Null((tight with { HasCapIpcLock = true }).Refusal(1UL << 40));
        Assert.Null((tight with { Limit = ulong.MaxValue }).Refusal(1UL << 40));
    }

    [Fact]
    public void The_allowance_is_this_process_limit_and_capability()
    {
        var a = MemoryLock.Current();
        var line = File.ReadLines("/proc/self/limits").First(l => l.StartsWith("Max locked memory", StringComparison.Ordinal));
        var soft = line["Max locked memory".Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[0];
        Assert.Equal(soft == "unlimited" ? ulong.MaxValue : ulong.Parse(soft, CultureInfo.InvariantCulture), a.Limit);
        var capEff = File.ReadLines("/proc/self/status").First(l => l.StartsWith("CapEff:", StringComparison.Ordinal));
        Assert.Equal((Convert.ToUInt64(capEff[7..].Trim(), 16) & (1UL << 14)) != 0, a.HasCapIpcLock);
    }

    [Fact]
    public void A_file_region_is_created_to_its_size_and_shared_with_file_io_both_ways()
    {
        var path = Path.Combine(_dir, "region");
        using (var r = SharedMemoryRegion.OpenFile(path, 2 * Page))
        {
            Assert.Equal(2 * Page, r.Size);
            Assert.Equal((long)(2 * Page), new FileInfo(path).Length);
            "mapped"u8.CopyTo(r.HostSpan(Page, 6));
            using (var h = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
            {
                var seen = new byte[6];
                RandomAccess.Read(h, seen, (long)Page);
                Assert.Equal("mapped"u8.ToArray(), seen);
                RandomAccess.Write(h, "filed"u8, 100);
            }
            Assert.Equal("filed"u8.ToArray(), r.HostSpan(100, 5).ToArray());
        }
        // Reopened larger: extended with zeros, contents kept; reopened without a size: its length.
        using (var r = SharedMemoryRegion.OpenFile(path, 4 * Page))
        {
            Assert.Equal("filed"u8.ToArray(), r.HostSpan(100, 5).ToArray());
            Assert.All(r.HostSpan(3 * Page, (int)Page).ToArray(), b => Assert.Equal(0, b));
        }
        using (var r = SharedMemoryRegion.OpenFile(path))
            Assert.Equal(4 * Page, r.Size);
    }

    [Fact]
    public void Files_that_cannot_back_a_region_are_refused_clearly()
    {
        var missing = Path.Combine(_dir, "missing");
        Assert.Contains("does not exist (give a size to create it)", Assert.Throws<HostMemoryException>(() => SharedMemoryRegion.OpenFile(missing)).Message);
        Assert.False(File.Exists(missing));
        Assert.Contains("not a positive multiple of 4 KiB", Assert.Throws<HostMemoryException>(() => SharedMemoryRegion.OpenFile(missing, 100)).Message);
        Assert.Contains("is not a regular file", Assert.Throws<HostMemoryException>(() => SharedMemoryRegion.OpenFile("/dev/null", Page)).Message);
        var odd = Path.Combine(_dir, "odd");
        File.WriteAllBytes(odd, new byte[5000]);
        Assert.Contains("5000 bytes long", Assert.Throws<HostMemoryException>(() => SharedMemoryRegion.OpenFile(odd)).Message);
        Assert.Contains("cannot be opened", Assert.Throws<HostMemoryException>(() => SharedMemoryRegion.OpenFile(_dir, Page)).Message);
    }

    [Fact]
    public void Wiring_locks_every_page_of_guest_memory_and_of_a_region()
    {
        using var map = new GuestMemoryMap();
        using var ram = new MemfdRegion("wired", 1 << 20);
        map.Add("ram", new GuestPhysAddr(0), 1 << 20, ram, owns: false);
        Assert.Equal(0UL, LockedBytes(ram.GuestView));

        Assert.Equal(1UL << 20, map.Wire());
        Assert.Equal(1UL << 20, map.LockedBytes);
        Assert.Equal(1UL << 20, LockedBytes(ram.GuestView));

        using var region = SharedMemoryRegion.Anonymous("wired-shm", 16 * Page);
        region.Lock();
        Assert.Equal(16 * Page, LockedBytes(region.Address));
    }
}
