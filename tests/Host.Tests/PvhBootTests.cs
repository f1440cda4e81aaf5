using System.Buffers.Binary;
using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// The PVH entry of an ELF kernel (Xen's x86/HVM direct boot ABI): the note found, the segments
/// loaded, hvm_start_info (version 1, offsets from xen/include/public/arch-x86/hvm/start_info.h
/// written out here), its module list and memory map, and the 32-bit entry state; refusals.
/// </summary>
public sealed class PvhBootTests
{
    private const ulong MiB = 1UL << 20;
    private const ulong KernelAddress = 0x100_0000;

    /// <summary>An ELF64 executable: one PT_LOAD of <paramref name="code"/> (+ bss) at 16 MiB and
    /// one PT_NOTE holding a "GNU" note and then the Xen PHYS32_ENTRY note (unless left out).</summary>
    public static byte[] Build(byte[] code, uint? entry = (uint)KernelAddress + 0x10, int descSize = 4, ulong bss = 0x1000)
    {
        var notes = new List<byte>();
        void Note(string name, uint type, byte[] desc)
        {
            var n = Encoding.ASCII.GetBytes(name + "\0");
            notes.AddRange(BitConverter.GetBytes((uint)n.Length));
            notes.AddRange(BitConverter.GetBytes((uint)desc.Length));
            notes.AddRange(BitConverter.GetBytes(type));
            notes.AddRange(n);
            while (notes.Count % 4 != 0) notes.Add(0);
            notes.AddRange(desc);
            while (notes.Count % 4 != 0) notes.Add(0);
        }
        Note("GNU", 3, [1, 2, 3, 4, 5, 6, 7, 8]);
        if (entry is { } e) Note("Xen", 18, BitConverter.GetBytes((ulong)e)[..descSize]);
        const int headers = 64 + 2 * 56;
        var file = new byte[headers + notes.Count + code.Length];
        file[0] = 0x7F; "ELF"u8.CopyTo(file.AsSpan(1));
        file[4] = 2; file[5] = 1; file[6] = 1;
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(16), 2);   // ET_EXEC
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(18), 62);  // EM_X86_64
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(20), 1);
        BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(24), 0xFFFF_FFFF_8100_0000); // e_entry: virtual, unused by PVH
        BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(32), 64);  // e_phoff
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(52), 64);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(54), 56);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(56), 2);
        void Ph(int i, uint type, ulong offset, ulong paddr, ulong filesz, ulong memsz)
        {
            var ph = file.AsSpan(64 + i * 56);
            BinaryPrimitives.WriteUInt32LittleEndian(ph, type);
            BinaryPrimitives.WriteUInt64LittleEndian(ph[8..], offset);
            BinaryPrimitives.WriteUInt64LittleEndian(ph[16..], paddr + 0xFFFF_FFFF_8000_0000);
            BinaryPrimitives.WriteUInt64LittleEndian(ph[24..], paddr);
            BinaryPrimitives.WriteUInt64LittleEndian(ph[32..], filesz);
            BinaryPrimitives.WriteUInt64LittleEndian(ph[40..], memsz);
        }
        Ph(0, 4, headers, 0, (ulong)notes.Count, 0); // PT_NOTE (memsz 0: not loaded)
        Ph(1, 1, (ulong)(headers + notes.Count), KernelAddress, (ulong)code.Length, (ulong)code.Length + bss);
        notes.ToArray().CopyTo(file, headers);
        code.CopyTo(file, headers + notes.Count);
        return file;
    }

    private static byte[] Code() => Enumerable.Range(0, 0x200).Select(i => (byte)(i * 5 + 3)).ToArray();

    private static byte[] Read(GuestMemoryMap m, ulong address, int length)
    {
        var b = new byte[length];
        m.Read(new GuestPhysAddr(address), b);
        return b;
    }

    [Fact]
    public void The_kernel_is_loaded_and_hvm_start_info_names_the_command_line_the_initrd_module_and_the_memory_map()
    {
        using var memory = VmspaceLayout.Build(256 * MiB);
        var initrd = Enumerable.Range(0, 5000).Select(i => (byte)i).ToArray();
        var image = KernelKind.Recognise(Build(Code()), "vmlinux", "console=ttyS0", initrd);
        Assert.IsType<PvhImage>(image);
        var boot = image.Load(memory);

        Assert.Equal(Code(), Read(memory, KernelAddress, 0x200));
        Assert.All(Read(memory, KernelAddress + 0x200, 0x1000), b => Assert.Equal(0, b)); // bss
        var info = Read(memory, 0x8000, 56);
        Assert.Equal(0x336E_C578u, BinaryPrimitives.ReadUInt32LittleEndian(info));       // magic
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(info.AsSpan(4)));       // version
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(info.AsSpan(8)));       // flags
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(info.AsSpan(12)));      // nr_modules
        var modlist = BinaryPrimitives.ReadUInt64LittleEndian(info.AsSpan(16));
        var cmdline = BinaryPrimitives.ReadUInt64LittleEndian(info.AsSpan(24));
        Assert.Equal(0UL, BinaryPrimitives.ReadUInt64LittleEndian(info.AsSpan(32)));     // rsdp_paddr: found by the BIOS-area scan
        var memmap = BinaryPrimitives.ReadUInt64LittleEndian(info.AsSpan(40));
        var entries = BinaryPrimitives.ReadUInt32LittleEndian(info.AsSpan(48));
        Assert.Equal([.. "console=ttyS0"u8.ToArray(), 0], Read(memory, cmdline, 14));

        var module = Read(memory, modlist, 32);
        var at = (256 * MiB - 5000) & ~0xFFFUL;
        Assert.Equal(at, BinaryPrimitives.ReadUInt64LittleEndian(module));
        Assert.Equal(5000UL, BinaryPrimitives.ReadUInt64LittleEndian(module.AsSpan(8)));
        Assert.Equal(initrd, Read(memory, at, 5000));

        (ulong, ulong, uint)[] expected =
        [
            (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (0x10_0000, 256 * MiB - 0x10_0000, 1),
            (0xFEC0_0000, 0x1000, 2), (0xFEE0_0000, 0x1000, 2), (0xFFFB_C000, 0x4000, 2),
        ];
        Assert.Equal((uint)expected.Length, entries);
        var table = Read(memory, memmap, 24 * expected.Length);
        for (var i = 0; i < expected.Length; i++)
        {
            Assert.Equal(expected[i].Item1, BinaryPrimitives.ReadUInt64LittleEndian(table.AsSpan(24 * i)));
            Assert.Equal(expected[i].Item2, BinaryPrimitives.ReadUInt64LittleEndian(table.AsSpan(24 * i + 8)));
            Assert.Equal(expected[i].Item3, BinaryPrimitives.ReadUInt32LittleEndian(table.AsSpan(24 * i + 16)));
            Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(table.AsSpan(24 * i + 20)));
        }

        Assert.Equal(KernelAddress + 0x10, boot.Registers!.Rip);
        Assert.Equal(0x8000UL, boot.Registers.Rbx);
        Assert.Equal(0x2UL, boot.Registers.Rflags);
        var seg = new SegmentState(0, 0, 0xFFFF, 3, true, 0, false, true, false, false, false);
        var s = boot.Special!(new SpecialRegisterState(seg, seg, seg, seg, seg, seg, seg, seg, new TableState(0, 0xFFFF),
            new TableState(0, 0xFFFF), 0x10, 0, 0, 0, 0, 0, 0xFEE0_0900));
        Assert.Equal(32, s.CodeBitness);
        Assert.Equal(0xFFFF_FFFFu, s.Ds.Limit);
        Assert.Equal(0UL, s.Cr0 & SpecialRegisterState.Cr0Pg);
        Assert.Equal(0UL, s.Cr4);
        Assert.Equal((byte)0xB, s.Tr.Type);
        Assert.Equal(0x67u, s.Tr.Limit);
    }

    [Fact]
    public void Without_an_initrd_there_is_no_module()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        new PvhImage(Build(Code()), "").Load(memory);
        var info = Read(memory, 0x8000, 56);
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(info.AsSpan(12)));
        Assert.Equal(0UL, BinaryPrimitives.ReadUInt64LittleEndian(info.AsSpan(16)));
    }

    [Fact]
    public void An_elf_kernel_without_a_pvh_note_a_short_note_or_an_entry_outside_it_is_refused()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        var none = Build(Code(), entry: null);
        Assert.Null(PvhImage.FindEntry(none));
        Assert.Contains("PVH entry note", Assert.Throws<BootException>(() => KernelKind.Recognise(none, "vmlinux", "", null)).Message);
        Assert.Contains("holds 2 bytes", Assert.Throws<BootException>(() => PvhImage.FindEntry(Build(Code(), descSize: 2))).Message);
        Assert.Contains("outside the kernel's loaded segments",
            Assert.Throws<BootException>(() => new PvhImage(Build(Code(), entry: 0x200_0000), "").Load(memory)).Message);
        Assert.Contains("the initrd is empty", Assert.Throws<BootException>(() => new PvhImage(Build(Code()), "", []).Load(memory)).Message);
    }
}
