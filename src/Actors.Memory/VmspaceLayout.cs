using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>One planned range of guest-physical space.</summary>
public sealed record LayoutRange(string Name, GuestPhysAddr Base, ulong Size, LayoutKind Kind);

public enum LayoutKind { Ram, Firmware, FirmwareAlias }

/// <summary>
/// Where guest RAM and firmware go in guest-physical space (a PC layout):
/// RAM from 0 up to the MMIO hole (3 GiB), the rest of RAM above 4 GiB; with firmware, the
/// image sits just below 4 GiB (the reset vector) and its last 128 KiB (or all of it, if smaller)
/// is aliased below 1 MiB, where real-mode code expects the BIOS; RAM has a hole there.
/// </summary>
public static class VmspaceLayout
{
    public const ulong PageSize = 4096;
    public const ulong MmioHoleStart = 0xC000_0000;
    public const ulong FourGiB = 0x1_0000_0000;
    public const ulong OneMiB = 0x10_0000;
    public const ulong MaxLowFirmwareAlias = 128 * 1024;
    public const ulong MinRam = 1 * OneMiB;
    public const ulong MaxRam = 1UL << 40;

    public static ulong AlignUp(ulong v) => (v + PageSize - 1) & ~(PageSize - 1);

    /// <summary>Plans the ranges; throws <see cref="ArgumentException"/> for an impossible request.</summary>
    public static IReadOnlyList<LayoutRange> Plan(ulong ramBytes, ulong firmwareBytes = 0)
    {
        if (ramBytes < MinRam) throw new ArgumentException($"memory size {ramBytes} is below the minimum of 1 MiB");
        if (ramBytes > MaxRam) throw new ArgumentException($"memory size {ramBytes} is above the maximum of 1 TiB");
        if (ramBytes % PageSize != 0) throw new ArgumentException($"memory size {ramBytes} is not a multiple of 4 KiB");
        var fw = AlignUp(firmwareBytes);
        if (fw > 16 * OneMiB) throw new ArgumentException($"firmware of {firmwareBytes} bytes is larger than 16 MiB");

        var ranges = new List<LayoutRange>();
        var low = Math.Min(ramBytes, MmioHoleStart);
        var high = ramBytes - low;
        if (fw == 0)
        {
            ranges.Add(new("ram-low", new GuestPhysAddr(0), low, LayoutKind.Ram));
        }
        else
        {
            var alias = Math.Min(fw, MaxLowFirmwareAlias);
            var aliasBase = OneMiB - alias;
            ranges.Add(new("ram-low", new GuestPhysAddr(0), Math.Min(low, aliasBase), LayoutKind.Ram));
            ranges.Add(new("firmware-alias", new GuestPhysAddr(aliasBase), alias, LayoutKind.FirmwareAlias));
            if (low > OneMiB) ranges.Add(new("ram", new GuestPhysAddr(OneMiB), low - OneMiB, LayoutKind.Ram));
            // RAM the alias hides below 1 MiB moves above 4 GiB: the guest gets all it asked for.
            high += Math.Min(low, OneMiB) > aliasBase ? Math.Min(low, OneMiB) - aliasBase : 0;
            ranges.Add(new("firmware", new GuestPhysAddr(FourGiB - fw), fw, LayoutKind.Firmware));
        }
        if (high > 0) ranges.Add(new("ram-high", new GuestPhysAddr(FourGiB), high, LayoutKind.Ram));
        return ranges;
    }

    /// <summary>
    /// Builds the memory map the plan describes: one memfd for all RAM (segments are windows into
    /// it), one for the firmware (its image copied in; the low alias shares its last pages). With
    /// <paramref name="superpages"/>, RAM is advised MADV_HUGEPAGE when the host's shmem THP
    /// setting allows huge pages (<see cref="ShmemHugePages"/>) — before anything is written, so a
    /// loader's writes can already land in huge pages. Leave it off for a vmspace that pages
    /// through userfaultfd: it fills 4 KiB pages, and a huge page written by the loader would only
    /// be split again by the first swap-out.
    /// </summary>
    public static GuestMemoryMap Build(ulong ramBytes, ReadOnlySpan<byte> firmware = default, bool superpages = false)
    {
        var plan = Plan(ramBytes, (ulong)firmware.Length);
        var map = new GuestMemoryMap();
        try
        {
            var ramTotal = plan.Where(r => r.Kind == LayoutKind.Ram).Aggregate(0UL, (a, r) => a + r.Size);
            var ram = new MemfdRegion("ram", ramTotal);
            try
            {
                if (superpages && ShmemHugePages.Read().Allowed) ram.AdviseHugePages();
            }
            catch
            {
                ram.Dispose();
                throw;
            }
            var ramOffset = 0UL;
            MemfdRegion? fw = null;
            foreach (var r in plan)
            {
                switch (r.Kind)
                {
                    case LayoutKind.Ram:
                        map.Add(r.Name, r.Base, r.Size, ram, ramOffset);
                        ramOffset += r.Size;
                        break;
                    case LayoutKind.Firmware:
                        fw ??= new MemfdRegion("firmware", r.Size);
                        // Right-align the image so its last byte sits at 4 GiB - 1 (the reset vector
                        // is 16 bytes below the top).
                        firmware.CopyTo(fw.HostSpan(r.Size - (ulong)firmware.Length, firmware.Length));
                        map.Add(r.Name, r.Base, r.Size, fw, 0, readOnly: true);
                        break;
                }
            }
            foreach (var r in plan.Where(r => r.Kind == LayoutKind.FirmwareAlias))
                map.Add(r.Name, r.Base, r.Size, fw!, fw!.Size - r.Size, readOnly: true, owns: false);
            return map;
        }
        catch
        {
            map.Dispose();
            throw;
        }
    }
}
