using System.Buffers.Binary;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Control;

/// <summary>
/// Translates a linear address the way the vcpu's MMU would (Intel SDM Vol 3A ch. 4: no paging,
/// 32-bit, PAE, 4-level), reading page tables through a guest-physical reader. Used by `ctl regs`
/// to show the code at RIP without stopping the vcpu.
/// </summary>
public static class GuestPageWalk
{
    public delegate Task<byte[]?> PhysicalReader(ulong address, int length);

    private const ulong Present = 1;
    private const ulong PageSizeBit = 1 << 7;
    private const ulong Cr4Pse = 1 << 4;
    private const ulong AddressMask = 0x000F_FFFF_FFFF_F000;

    /// <summary>The guest-physical address of <paramref name="linear"/>, or null if not mapped.</summary>
    public static async Task<ulong?> TranslateAsync(SpecialRegisterState s, ulong linear, PhysicalReader read)
    {
        if ((s.Cr0 & SpecialRegisterState.Cr0Pg) == 0) return linear & 0xFFFF_FFFF;
        if ((s.Efer & SpecialRegisterState.EferLma) != 0)
        {
            var table = s.Cr3 & AddressMask;
            for (var level = 3; level >= 0; level--)
            {
                var index = (linear >> (12 + 9 * level)) & 0x1FF;
                var entry = await Entry64(read, table + index * 8);
                if (entry is not { } e || (e & Present) == 0) return null;
                if (level is 1 or 2 && (e & PageSizeBit) != 0)
                {
                    var size = 1UL << (12 + 9 * level);
                    return (e & AddressMask & ~(size - 1)) | (linear & (size - 1));
                }
                if (level == 0) return (e & AddressMask) | (linear & 0xFFF);
                table = e & AddressMask;
            }
            return null;
        }
        if ((s.Cr4 & SpecialRegisterState.Cr4Pae) != 0)
        {
            var pdpte = await Entry64(read, (s.Cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8);
            if (pdpte is not { } p || (p & Present) == 0) return null;
            var pde = await Entry64(read, (p & AddressMask) + ((linear >> 21) & 0x1FF) * 8);
            if (pde is not { } d || (d & Present) == 0) return null;
            if ((d & PageSizeBit) != 0) return (d & AddressMask & ~0x1F_FFFFUL) | (linear & 0x1F_FFFF);
            var pte = await Entry64(read, (d & AddressMask) + ((linear >> 12) & 0x1FF) * 8);
            return pte is { } t && (t & Present) != 0 ? (t & AddressMask) | (linear & 0xFFF) : null;
        }
        {
            var pde = await Entry32(read, (s.Cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4);
            if (pde is not { } d || (d & Present) == 0) return null;
            if ((d & PageSizeBit) != 0 && (s.Cr4 & Cr4Pse) != 0) return (d & 0xFFC0_0000) | (linear & 0x3F_FFFF);
            var pte = await Entry32(read, (d & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4);
            return pte is { } t && (t & Present) != 0 ? (t & 0xFFFF_F000) | (linear & 0xFFF) : null;
        }
    }

    /// <summary>Reads up to <paramref name="length"/> bytes at a linear address, page by page;
    /// stops at the first unmapped or unreadable page.</summary>
    public static async Task<byte[]> ReadLinearAsync(SpecialRegisterState s, ulong linear, int length, PhysicalReader read)
    {
        var result = new List<byte>(length);
        while (result.Count < length)
        {
            var physical = await TranslateAsync(s, linear, read);
            if (physical is not { } p) break;
            var n = (int)Math.Min(4096 - (linear & 0xFFF), (ulong)(length - result.Count));
            var bytes = await read(p, n);
            if (bytes is null) break;
            result.AddRange(bytes);
            linear += (ulong)n;
        }
        return result.ToArray();
    }

    private static async Task<ulong?> Entry64(PhysicalReader read, ulong address) =>
        await read(address, 8) is { Length: 8 } b ? BinaryPrimitives.ReadUInt64LittleEndian(b) : null;

    private static async Task<ulong?> Entry32(PhysicalReader read, ulong address) =>
        await read(address, 4) is { Length: 4 } b ? BinaryPrimitives.ReadUInt32LittleEndian(b) : null;
}
