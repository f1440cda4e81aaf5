using System.Buffers.Binary;
using System.Text;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Boot;

/// <summary>
/// An uncompressed kernel ELF (Linux's vmlinux) entered through its PVH entry point, the x86/HVM
/// direct boot ABI of Xen's docs/misc/pvh.pandoc (as Firecracker and Cloud Hypervisor boot
/// vmlinux): the kernel names its 32-bit entry in an ELF note (owner "Xen", type
/// XEN_ELFNOTE_PHYS32_ENTRY = 18). The loader copies the PT_LOAD segments to their physical
/// addresses, writes the start-of-day structure hvm_start_info (xen/include/public/arch-x86/hvm/
/// start_info.h, version 1: with a memory map) and enters in 32-bit protected mode, paging off:
/// EBX = the structure, CS a flat 32-bit execute/read segment, DS/ES/SS flat read/write, TR a
/// 32-bit busy TSS with base 0 and limit 0x67, CR0 = PE, CR4 = 0, EFLAGS.IF clear.
/// Layout: GDT 0x1000 (<see cref="LongModeImage.WriteGdt"/>), hvm_start_info 0x8000, its module
/// list 0x8040, its memory map 0x8100, the command line 0x20000; the initrd (the one module) page
/// aligned as high in the kernel's RAM range below 4 GiB as it fits, above the kernel.
/// </summary>
public sealed record PvhImage(byte[] Kernel, string CommandLine, byte[]? Initrd = null) : BootImage
{
    public const uint StartInfoMagic = 0x336E_C578; // "xEn3" with the 0x80 bit of the "E" set
    public const uint StartInfoVersion = 1;
    public const uint XenElfnotePhys32Entry = 18;
    public const uint PtNote = 4;

    public const ulong StartInfoAddress = 0x8000;
    public const int StartInfoSize = 56;
    public const ulong ModuleListAddress = 0x8040;
    public const int ModuleEntrySize = 32;
    public const ulong MemoryMapAddress = 0x8100;
    public const int MemoryMapEntrySize = 24;
    public const int MaxMemoryMapEntries = 128;
    public const ulong CommandLineAddress = 0x20000;
    public const ulong CommandLineLimit = 0x9F000;
    public const ulong BootAreaEnd = CommandLineLimit;

    /// <summary>The PVH entry an ELF file names (XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment), or null.
    /// Every offset and size is checked against the file: a malformed note is a <see cref="BootException"/>.</summary>
    public static uint? FindEntry(ReadOnlySpan<byte> file)
    {
        if (!ElfImage.HasElfMagic(file) || file.Length < 52) return null;
        var is64 = file[4] == 2;
        if (is64 && file.Length < 64) return null;
        var phoff = is64 ? BinaryPrimitives.ReadUInt64LittleEndian(file[32..]) : BinaryPrimitives.ReadUInt32LittleEndian(file[28..]);
        int phentsize = BinaryPrimitives.ReadUInt16LittleEndian(file[(is64 ? 54 : 42)..]);
        int phnum = BinaryPrimitives.ReadUInt16LittleEndian(file[(is64 ? 56 : 44)..]);
        if (phentsize < (is64 ? 56 : 32) || phoff > (ulong)file.Length || (ulong)phnum * (ulong)phentsize > (ulong)file.Length - phoff)
            return null; // ElfImage.Parse reports the malformed headers
        for (var i = 0; i < phnum; i++)
        {
            var ph = file.Slice((int)phoff + i * phentsize, phentsize);
            if (BinaryPrimitives.ReadUInt32LittleEndian(ph) != PtNote) continue;
            var offset = is64 ? BinaryPrimitives.ReadUInt64LittleEndian(ph[8..]) : BinaryPrimitives.ReadUInt32LittleEndian(ph[4..]);
            var size = is64 ? BinaryPrimitives.ReadUInt64LittleEndian(ph[32..]) : BinaryPrimitives.ReadUInt32LittleEndian(ph[16..]);
            if (offset > (ulong)file.Length || size > (ulong)file.Length - offset)
                throw new BootException($"ELF note segment {i} lies outside the file");
            var notes = file.Slice((int)offset, (int)size);
            // Note entries (ELF gABI "Note Section"): namesz, descsz, type, then name and desc, each 4-byte aligned.
            while (notes.Length >= 12)
            {
                var nameSize = BinaryPrimitives.ReadUInt32LittleEndian(notes);
                var descSize = BinaryPrimitives.ReadUInt32LittleEndian(notes[4..]);
                var type = BinaryPrimitives.ReadUInt32LittleEndian(notes[8..]);
                var nameEnd = 12 + (((ulong)nameSize + 3) & ~3UL);
                var descEnd = nameEnd + (((ulong)descSize + 3) & ~3UL);
                if (descEnd > (ulong)notes.Length) throw new BootException($"an ELF note in segment {i} runs past its segment");
                var name = notes.Slice(12, (int)nameSize);
                if (type == XenElfnotePhys32Entry && name.SequenceEqual("Xen\0"u8))
                {
                    if (descSize < 4) throw new BootException($"the XEN_ELFNOTE_PHYS32_ENTRY note holds {descSize} bytes, not a 32-bit entry");
                    return BinaryPrimitives.ReadUInt32LittleEndian(notes[(int)nameEnd..]);
                }
                notes = notes[(int)descEnd..];
            }
        }
        return null;
    }

    public override BootState Load(IGuestMemory memory)
    {
        var entry = FindEntry(Kernel) ?? throw new BootException("the ELF kernel has no XEN_ELFNOTE_PHYS32_ENTRY note: it has no PVH entry point");
        var elf = ElfImage.Parse(Kernel, "the PVH kernel");
        Require(memory.IsMapped(new GuestPhysAddr(0), BootAreaEnd), "guest RAM does not cover the low memory the boot structures need");
        var ram = memory.Ranges.Where(r => !r.ReadOnly).ToArray();
        ulong kernelEnd = 0;
        GuestRange home = default;
        foreach (var s in elf.Segments)
        {
            Require(s.PhysicalAddress >= BootAreaEnd,
                $"kernel segment at 0x{s.PhysicalAddress:X} overlaps the boot structures below 0x{BootAreaEnd:X}");
            var range = ram.FirstOrDefault(r => r.Base.Value <= s.PhysicalAddress && s.PhysicalAddress + s.MemorySize <= r.End);
            Require(range.Size > 0 && s.PhysicalAddress + s.MemorySize <= uint.MaxValue,
                $"kernel segment at 0x{s.PhysicalAddress:X} ({s.MemorySize} bytes) does not fit in guest RAM below 4 GiB");
            memory.Write(new GuestPhysAddr(s.PhysicalAddress), Kernel.AsSpan((int)s.FileOffset, (int)s.FileSize));
            if (s.MemorySize > s.FileSize)
                memory.Write(new GuestPhysAddr(s.PhysicalAddress + s.FileSize), new byte[s.MemorySize - s.FileSize]);
            if (s.PhysicalAddress + s.MemorySize > kernelEnd)
            {
                kernelEnd = s.PhysicalAddress + s.MemorySize;
                home = range;
            }
        }
        Require(elf.Segments.Any(s => entry >= s.PhysicalAddress && entry < s.PhysicalAddress + s.MemorySize),
            $"the PVH entry 0x{entry:X} is outside the kernel's loaded segments");

        var cmdline = Encoding.UTF8.GetBytes(CommandLine);
        Require(CommandLineAddress + (ulong)cmdline.Length + 1 <= CommandLineLimit,
            $"the command line is {cmdline.Length} bytes; at most {CommandLineLimit - CommandLineAddress - 1} fit below the EBDA");
        memory.Write(new GuestPhysAddr(CommandLineAddress), [.. cmdline, 0]);

        var info = new byte[StartInfoSize];
        BinaryPrimitives.WriteUInt32LittleEndian(info, StartInfoMagic);
        BinaryPrimitives.WriteUInt32LittleEndian(info.AsSpan(4), StartInfoVersion);
        BinaryPrimitives.WriteUInt64LittleEndian(info.AsSpan(24), CommandLineAddress); // cmdline_paddr
        if (Initrd is not null)
        {
            Require(Initrd.Length > 0, "the initrd is empty");
            var ceiling = Math.Min(home.End, 1UL << 32);
            var at = ceiling >= (ulong)Initrd.Length ? (ceiling - (ulong)Initrd.Length) & ~0xFFFUL : 0;
            Require(ceiling >= (ulong)Initrd.Length && at >= kernelEnd,
                $"the initrd of {Initrd.Length} bytes does not fit between the kernel's end 0x{kernelEnd:X} and the end of its RAM 0x{ceiling:X}");
            memory.Write(new GuestPhysAddr(at), Initrd);
            var module = new byte[ModuleEntrySize];
            BinaryPrimitives.WriteUInt64LittleEndian(module, at);
            BinaryPrimitives.WriteUInt64LittleEndian(module.AsSpan(8), (ulong)Initrd.Length);
            memory.Write(new GuestPhysAddr(ModuleListAddress), module);
            BinaryPrimitives.WriteUInt32LittleEndian(info.AsSpan(12), 1);                      // nr_modules
            BinaryPrimitives.WriteUInt64LittleEndian(info.AsSpan(16), ModuleListAddress);      // modlist_paddr
        }
        var map = LinuxImage.E820Map(memory.Ranges);
        Require(map.Count <= MaxMemoryMapEntries, $"{map.Count} memory map entries; at most {MaxMemoryMapEntries}");
        var table = new byte[MemoryMapEntrySize * map.Count];
        for (var i = 0; i < map.Count; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(table.AsSpan(i * MemoryMapEntrySize), map[i].Address);
            BinaryPrimitives.WriteUInt64LittleEndian(table.AsSpan(i * MemoryMapEntrySize + 8), map[i].Size);
            BinaryPrimitives.WriteUInt32LittleEndian(table.AsSpan(i * MemoryMapEntrySize + 16), map[i].Type);
        }
        memory.Write(new GuestPhysAddr(MemoryMapAddress), table);
        BinaryPrimitives.WriteUInt64LittleEndian(info.AsSpan(40), MemoryMapAddress); // memmap_paddr
        BinaryPrimitives.WriteUInt32LittleEndian(info.AsSpan(48), (uint)map.Count);  // memmap_entries
        memory.Write(new GuestPhysAddr(StartInfoAddress), info);
        LongModeImage.WriteGdt(memory);

        var regs = RegisterState.Reset with { Rbx = StartInfoAddress, Rip = entry, Rsp = 0, Rflags = 0x2 };
        return new BootState(regs, s => s with
        {
            Cs = SegmentState.Flat32(LongModeImage.Code32Selector, code: true),
            Ds = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Es = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Fs = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Gs = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Ss = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            // A 32-bit busy TSS (type 0xB, a system segment), base 0, limit 0x67.
            Tr = new SegmentState(0, 0, 0x67, 0xB, true, 0, false, false, false, false, false),
            Gdt = new TableState(LongModeImage.GdtAddress, 4 * 8 - 1),
            Idt = new TableState(0, 0),
            Cr0 = SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Et,
            Cr3 = 0,
            Cr4 = 0,
            Efer = 0,
        });
    }
}
